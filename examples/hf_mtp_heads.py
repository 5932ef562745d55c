"""H = 4 future-token heads on a Hugging Face causal LM, trained with TD weights from a value head.

Meta's multi-token layout: the trunk is every decoder layer but the last; head 1 is the model's own last
layer, heads 2..H are extra decoder layers (copies of the last one) applied to the same trunk states;
all heads share the final norm and the unembedding. A forward pre-hook on the last layer captures the
trunk states and the keyword arguments HF passes to its layers (causal mask, rotary embeddings), so the
extra blocks see exactly what the last layer sees. A linear value head on the trunk states gives the
critic values that ``fused_weighted_mtp_loss`` turns into per-token TD weights; the critic itself learns
from ``value_loss`` (the weights are a stop-gradient importance weighting here).

Run: ``python examples/hf_mtp_heads.py`` (``pip install -e ".[hf]"``; a tiny random model, a few steps).
"""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_kernels import WeightingOptions, fused_weighted_mtp_loss, value_loss


class MultiTokenHeads(nn.Module):
    """An HF causal LM with ``n_heads`` future-token heads and a value head (Meta's layout).

    Args:
        model: A decoder-only HF model with ``model.model.layers``, ``model.model.norm``, ``lm_head``.
        n_heads: H, the number of future tokens predicted at each position.
    """

    def __init__(self, model: LlamaForCausalLM, n_heads: int = 4) -> None:
        super().__init__()
        self.model = model
        last = model.model.layers[-1]
        self.extra_heads = nn.ModuleList(copy.deepcopy(last) for _ in range(n_heads - 1))
        self.value_head = nn.Linear(model.config.hidden_size, 1)
        self._last_layer_inputs = None
        last.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, _module, args, kwargs):
        self._last_layer_inputs = (args, kwargs)

    def forward(self, input_ids, attention_mask):
        """``hidden [B, T, H, d]`` (final-normed) and critic ``values [B, T, 1]``."""
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        head1 = out.last_hidden_state
        args, kwargs = self._last_layer_inputs
        self._last_layer_inputs = None
        trunk, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        extra = [block(trunk, *rest, **kwargs) for block in self.extra_heads]
        extra = [self.model.model.norm(x[0] if isinstance(x, tuple) else x) for x in extra]
        return torch.stack([head1, *extra], dim=2), self.value_head(trunk)


def tiny_model(seed: int = 0, n_heads: int = 4) -> MultiTokenHeads:
    """A 3-layer random Llama (2 trunk layers + head 1) with H heads, built from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return MultiTokenHeads(LlamaForCausalLM(config).float(), n_heads)


def synthetic_batch(vocab: int, step: int) -> tuple[torch.Tensor, ...]:
    """Sequences that count up modulo V (learnable), a prompt, right padding and 0/1 rewards."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (4, 1), generator=g)
    input_ids = (start + torch.arange(16)) % vocab
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 12:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    rewards = torch.randint(0, 2, (4,), generator=g).float()
    return input_ids, attention_mask, labels, rewards


def train(steps: int = 30, seed: int = 0, lr: float = 3e-3) -> tuple[list[float], MultiTokenHeads]:
    """Train the H-head model with TD-weighted MTP loss + value loss; the MTP losses and the model."""
    model = tiny_model(seed)
    weighting = WeightingOptions(gamma=1.0, beta=0.9, min_weight=0.1, max_weight=5.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        input_ids, attention_mask, labels, rewards = synthetic_batch(model.model.config.vocab_size, step)
        hidden, values = model(input_ids, attention_mask)
        mtp = fused_weighted_mtp_loss(
            hidden,
            model.model.lm_head.weight,
            labels,
            attention_mask,
            values=values.detach(),
            rewards=rewards,
            options=weighting,
        )
        loss = mtp + 0.5 * value_loss(values, rewards, attention_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mtp.item())
    return losses, model


if __name__ == "__main__":
    history, _ = train()
    print(f"MTP loss {history[0]:.3f} -> {history[-1]:.3f}")
