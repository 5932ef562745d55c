"""Small models for the generation / speculative decoding tests (random, head-copied, pattern-trained)."""

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.model import ModelArgs, MTPTransformer, build_model

# Byte vocabulary so that ByteTokenizer can decode stop sequences.
TINY_DECODER = ModelArgs(
    dim=32, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=ByteTokenizer.vocab_size, multiple_of=16
)


def tiny_decoder(seed: int = 0, **overrides) -> MTPTransformer:
    """A randomly initialised tiny MTP model (2 trunk blocks + 4 heads) in eval mode."""
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(TINY_DECODER, **overrides)).eval()


def copy_head_one_into_extra_heads(model: MTPTransformer) -> MTPTransformer:
    """Make every extra head compute exactly what the next-token head computes."""
    for block in model.extra_heads:
        block.load_state_dict(model.layers[-1].state_dict())
    return model


def random_prompts(n: int, seed: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    """``n`` prompts of bos + random bytes with random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [
        [ByteTokenizer.bos_id, *torch.randint(0, 256, (n_bytes,), generator=g).tolist()]
        for n_bytes in lengths
    ]


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread (tiny models are much slower with several threads on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mtp_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Unweighted MTP loss: head k at position t predicts ids[t + k]; logits [B, T, H, V]."""
    n_heads, vocab = logits.shape[2], logits.shape[3]
    return sum(
        F.cross_entropy(logits[:, :-k, k - 1].reshape(-1, vocab), ids[:, k:].reshape(-1))
        for k in range(1, n_heads + 1)
    )


def pattern_trained_decoder(period: int = 7, steps: int = 40) -> MTPTransformer:
    """A tiny model fitted (all heads) to a periodic byte sequence, so that its extra heads draft well
    and speculative decoding accepts many drafts."""
    model = tiny_decoder(seed=1).train()
    cycle = torch.arange(period) + ord("a")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with single_thread():
        for _ in range(steps):
            starts = torch.randint(0, period, (8, 1), generator=g)
            ids = cycle[(starts + torch.arange(48)) % period]
            loss = mtp_cross_entropy(model.full_forward(ids, return_logits=True).logits, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
