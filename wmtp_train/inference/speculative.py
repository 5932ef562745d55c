"""Self-speculative greedy decoding with the MTP heads (blockwise parallel decoding, Stern et al. 2018,
as used by Gloeckle et al. 2024 for Meta's MTP models).

One forward over the last committed token y and the drafts d_2..d_H gives, at every input position j,
the next-token head's greedy choice g_j and the extra heads' predictions. The drafts are verified in
that same forward: d_{i+2} is accepted when every earlier draft was and ``g_i == d_{i+2}``. With a
accepted drafts the row emits ``d_2 .. d_{a+1}, g_a`` (a + 1 tokens), the extra heads at position a
propose the next drafts, and the cache slots of the rejected drafts are dropped. Every emitted token is
the next-token head's argmax given exactly the committed prefix, so the output is the one plain greedy
decoding (:func:`wmtp_train.inference.generation.generate_ids`) produces, up to floating-point ties.

Rows of a batch accept different numbers of drafts; their rejected slots become masked holes in the
shared cache (see :class:`wmtp_train.inference.kv_cache.KVCache`), so the batch stays rectangular.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from wmtp_train.inference.generation import (
    DecodeStats,
    Generation,
    GenerationConfig,
    RowStopper,
    check_room,
    encode_prompts,
    left_pad,
    with_eos,
)
from wmtp_train.inference.kv_cache import cached_forward, new_cache
from wmtp_train.model import MTPTransformer


def accepted_drafts(verified: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """Length of the accepted draft prefix per row.

    Args:
        verified: [B, H] next-token head argmax after each input position (y, d_2, ..., d_H).
        drafts: [B, H - 1] draft tokens d_2..d_H.

    Returns:
        [B] int64 counts in [0, H - 1].
    """
    if verified.shape[1] != drafts.shape[1] + 1:
        raise ValueError(
            f"verified {tuple(verified.shape)} must have one column more than drafts {tuple(drafts.shape)}"
        )
    matches = (verified[:, :-1] == drafts).long()
    return matches.cumprod(dim=1).sum(dim=1)


@torch.inference_mode()
def speculative_generate_ids(
    model: MTPTransformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    pad_id: int,
    decode: Callable[[list[int]], str] | None = None,
    stats: DecodeStats | None = None,
    n_draft_heads: int | None = None,
) -> list[Generation]:
    """Greedy decoding accelerated by the model's own extra heads (lossless, see the module docstring).

    Args:
        model: the MTP model (eval mode); with H = 1 this is plain greedy decoding.
        prompts: token id lists.
        config: decoding options; ``temperature`` must be 0.
        pad_id: id used for left padding.
        decode: ids -> text, for stop sequences and ``Generation.text``.
        stats: counters to fill (forwards, generated / drafted / accepted tokens).
        n_draft_heads: extra heads used for drafting (default: all H - 1).

    Returns:
        One :class:`Generation` per prompt, identical to ``generate_ids`` with the same config.
    """
    if config.temperature != 0:
        raise ValueError(f"speculative decoding is greedy only; got temperature={config.temperature}")
    n_extra = model.n_future_tokens - 1 if n_draft_heads is None else n_draft_heads
    if not 0 <= n_extra <= model.n_future_tokens - 1:
        raise ValueError(f"n_draft_heads must be in [0, {model.n_future_tokens - 1}], got {n_draft_heads}")
    n_heads = n_extra + 1
    check_room(model, prompts, config.max_new_tokens + n_extra)
    device = model.tok_embeddings.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    stats = stats if stats is not None else DecodeStats()
    rows = [RowStopper(config, decode) for _ in prompts]
    cache = new_cache(model, len(prompts), n_heads, ids.shape[1] + n_heads * (config.max_new_tokens + 1))

    logits = cached_forward(model, cache, ids, mask, n_heads, last_only=True)[:, 0]  # [B, n_heads, V]
    stats.forwards += 1
    stats.row_forwards += len(rows)
    token = logits[:, 0].argmax(-1)  # [B]
    drafts = logits[:, 1:].argmax(-1)  # [B, n_extra]
    for row, t in zip(rows, token.tolist()):
        row.push(t)
        stats.generated_tokens += 1

    while not all(r.done for r in rows):
        block = torch.cat([token.unsqueeze(1), drafts], dim=1)  # [B, n_heads]
        start = cache.length
        logits = cached_forward(model, cache, block, torch.ones_like(block, dtype=torch.bool), n_heads)
        greedy = logits.argmax(-1)  # [B, n_heads (positions), n_heads (heads)]
        verified = greedy[:, :, 0]
        n_accepted = accepted_drafts(verified, drafts)
        stats.forwards += 1
        for b, row in enumerate(rows):
            if row.done:
                continue
            stats.row_forwards += 1
            a = int(n_accepted[b])
            stats.drafted_tokens += n_extra
            stats.accepted_tokens += a
            for t in [*drafts[b, :a].tolist(), int(verified[b, a])]:
                stats.generated_tokens += 1
                if row.push(t):
                    break
            cache.drop(b, start + a + 1, start + n_heads)
        index = n_accepted.view(-1, 1, 1).expand(-1, 1, n_heads)
        at_last = greedy.gather(1, index).squeeze(1)  # [B, n_heads] predictions at position a
        token, drafts = at_last[:, 0], at_last[:, 1:]
    return [r.result() for r in rows]


def speculative_generate(
    model: MTPTransformer,
    tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    stats: DecodeStats | None = None,
) -> list[Generation]:
    """Text-prompt wrapper of :func:`speculative_generate_ids` (eos always stops a row).

    Args:
        model: the MTP model.
        tokenizer: its tokenizer.
        prompts: prompt strings.
        config: decoding options (greedy).
        stats: counters to fill.

    Returns:
        One :class:`Generation` per prompt.
    """
    config = with_eos(config, tokenizer.eos_id)
    return speculative_generate_ids(
        model, encode_prompts(tokenizer, prompts), config, tokenizer.pad_id, tokenizer.decode, stats
    )
