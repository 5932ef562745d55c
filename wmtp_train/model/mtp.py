"""Meta's multi-token-prediction (MTP) Llama with a value head, in plain trainable PyTorch.

Layout (parameter names match Meta's consolidated checkpoints, see ``checkpoint_meta.py``):

- ``tok_embeddings``: token embedding.
- ``layers``: ``n_layers - n_future_tokens + 1`` Llama blocks. ``layers[:-1]`` is the shared trunk,
  ``layers[-1]`` the head block of the next-token head (head 1).
- ``extra_heads``: ``n_future_tokens - 1`` blocks, the heads 2..H. Every head block reads the trunk
  output independently (the heads are parallel, not stacked).
- ``head``: :class:`MTPOutputHead`, holding the shared final ``norm`` and the shared unembedding
  ``output`` (not tied to the embedding). The weighted loss is computed inside its ``forward`` so that
  FSDP2 all-gathers ``norm`` / ``output`` around that call and the loss never sees a sharded DTensor.
- ``value_head``: :class:`ValueHead` on the trunk output, V(s_t) ≈ P(success | x_<=t).

Head k (1..H) at position t predicts token t+k.

Padding: ``attention_mask[b, t] = 1`` marks real tokens. Attention ignores padded keys and RoPE positions
are ``cumsum(mask) - 1``, so a sequence gives the same hidden states and values on its real tokens
whether it is left- or right-padded. Padded queries attend to themselves only (never a NaN row).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VALUE_HEAD_KINDS = ("mlp", "linear")
VALUE_OUTPUTS = ("sigmoid", "identity")


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of an MTP Llama model (Meta's ``params.json`` keys plus the value head options).

    Frozen: derive variants with ``dataclasses.replace``.
    """

    dim: int
    """Model (residual stream) width d."""
    n_layers: int
    """Total number of transformer blocks: trunk + H head blocks (Meta's convention)."""
    n_heads: int
    """Attention query heads."""
    vocab_size: int
    """Vocabulary size V of the embedding and of the shared unembedding."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means ``n_heads`` (plain multi-head)."""
    multiple_of: int = 256
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional scale of the SwiGLU hidden width (Llama 2 70B / Llama 3 use it)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    n_future_tokens: int = 4
    """Number of prediction heads H (1 = a plain next-token Llama)."""
    max_seq_len: int = 4096
    """Longest sequence accepted by the forward passes."""
    value_head: str = "mlp"
    """``"mlp"`` (RMSNorm, Linear(d, d), SiLU, Linear(d, 1)) or ``"linear"`` (RMSNorm, Linear(d, 1)).
    The MLP is the default: a critic of P(success) from a shared trunk benefits from a non-linearity
    of its own, at a cost of d² + d parameters."""
    value_output: str = "sigmoid"
    """``"sigmoid"`` squashes V to (0, 1), matching V ≈ P(success) with rewards in {0, 1};
    ``"identity"`` leaves V unbounded, for rewards outside [0, 1]."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "n_future_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"ModelArgs.max_seq_len must be a positive int, got {self.max_seq_len!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got dim / n_heads = {self.head_dim}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads
        ):
            raise ValueError(
                f"ModelArgs.n_kv_heads ({self.n_kv_heads!r}) must be a positive divisor of "
                f"n_heads ({self.n_heads})"
            )
        if self.n_layers < self.n_future_tokens:
            raise ValueError(
                f"ModelArgs.n_layers ({self.n_layers}) must be >= n_future_tokens ({self.n_future_tokens}): "
                "each head is one block"
            )
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(
                f"ModelArgs.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelArgs.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.value_head not in VALUE_HEAD_KINDS:
            raise ValueError(
                f"ModelArgs.value_head must be one of {VALUE_HEAD_KINDS}, got {self.value_head!r}"
            )
        if self.value_output not in VALUE_OUTPUTS:
            raise ValueError(
                f"ModelArgs.value_output must be one of {VALUE_OUTPUTS}, got {self.value_output!r}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks shared by all heads."""
        return self.n_layers - self.n_future_tokens

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width, computed exactly as Meta's Llama ``FeedForward`` does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params_json(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from the dict of a Meta ``params.json`` (plus optional overrides).

        Keys that are not fields (Meta's ``max_batch_size``, ``use_scaled_rope: false``) are ignored
        only when they cannot change the model; anything else unknown is an error.

        Args:
            params: the parsed ``params.json``. ``n_future_tokens`` defaults to 1 (a plain Llama).
            overrides: field values that replace those of ``params`` (e.g. ``vocab_size`` when the
                file says -1, or ``value_head``).

        Returns:
            The validated arguments.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict, got {type(params).__name__}")
        merged = {"n_future_tokens": 1, **params, **overrides}
        field_names = {f.name for f in dataclasses.fields(cls)}
        harmless = {"max_batch_size"}
        if merged.pop("use_scaled_rope", False):
            raise ValueError("params.json: use_scaled_rope=true (Llama 3.1 RoPE scaling) is not supported")
        unknown = sorted(set(merged) - field_names - harmless)
        if unknown:
            raise ValueError(f"params.json: unknown keys {unknown}; known keys are {sorted(field_names)}")
        return cls(**{k: v for k, v in merged.items() if k in field_names})

    def to_params_json(self) -> dict[str, Any]:
        """The Meta ``params.json`` dict (Meta's keys only, so Meta's own loader accepts it)."""
        meta_keys = (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "n_future_tokens",
            "max_seq_len",
        )
        return {k: getattr(self, k) for k in meta_keys}


PRESETS: dict[str, ModelArgs] = {
    # ~1.5 M parameters: 4 trunk blocks + 4 head blocks, GQA 4/2, byte vocabulary (256 bytes + pad, bos,
    # eos, one reserved id: wmtp_train.data.tokenizer.ByteTokenizer). Trains on a 2-core CPU.
    "micro": ModelArgs(
        dim=128,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=260,
        multiple_of=32,
        n_future_tokens=4,
        max_seq_len=2048,
    ),
    # ~70 M parameters with the Llama 2 sentencepiece vocabulary.
    "small": ModelArgs(
        dim=512,
        n_layers=12,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=32000,
        multiple_of=128,
        n_future_tokens=4,
        max_seq_len=2048,
    ),
    # The shapes of Meta's 7B_1T_4 release: 28 trunk blocks + 4 head blocks, FFN 11008.
    "7b_1t_4": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        vocab_size=32000,
        multiple_of=256,
        norm_eps=1e-5,
        rope_theta=10000.0,
        n_future_tokens=4,
        max_seq_len=4096,
    ),
}


@dataclass(frozen=True)
class LossOptions:
    """Options of the weighted MTP loss, forwarded to ``wmtp_kernels.fused_weighted_mtp_loss``."""

    gamma: float = 1.0
    """TD discount."""
    beta: float = 0.9
    """Temperature of the exponential weights exp(td / beta)."""
    min_weight: float = 0.1
    """Lower clip of the weights."""
    max_weight: float = 5.0
    """Upper clip of the weights."""
    terminal: str = "last_state"
    """Terminal TD convention: ``"last_state"`` or ``"last_transition"`` (SPEC §2)."""
    ignore_index: int = -100
    """Label value excluded from the loss (prompt tokens)."""
    reduction: str = "mean"
    """``"mean"``, ``"sum"`` or ``"none"``."""
    return_stats: bool = False
    """Also return per-head CE and TD / weight statistics."""
    check_finite: bool = False
    """Raise ``ValueError`` naming the tensor when the hidden states or values hold NaN / Inf."""
    implementation: str = "fused"
    """``"fused"`` (``wmtp_kernels.fused_weighted_mtp_loss``) or ``"reference"`` (the plain PyTorch
    ``wmtp_kernels.reference.weighted_mtp_loss_from_hidden``, same signature; for A/B comparisons)."""

    def __post_init__(self) -> None:
        if self.implementation not in ("fused", "reference"):
            raise ValueError(
                f"LossOptions.implementation must be 'fused' or 'reference', got {self.implementation!r}"
            )
        if self.check_finite and self.implementation != "fused":
            raise ValueError("LossOptions: check_finite needs implementation='fused'")


class TrunkOutput(NamedTuple):
    """Result of :meth:`MTPTransformer.trunk_forward`."""

    hidden: torch.Tensor
    """[B, T, d] raw trunk output (before any head block or norm)."""
    values: torch.Tensor
    """[B, T, 1] value estimates V(s_t)."""


@dataclass
class ModelOutput:
    """Result of :meth:`MTPTransformer.full_forward` and :meth:`MTPTransformer.forward`."""

    values: torch.Tensor
    """[B, T, 1] value estimates V(s_t)."""
    hidden: torch.Tensor | None = None
    """[B, T, H, d] final-normed hidden states of the heads."""
    logits: torch.Tensor | None = None
    """[B, T, H, V] float32 logits, only when asked for."""
    loss: torch.Tensor | None = None
    """Weighted MTP loss (scalar, or [B, T, H] with ``reduction="none"``)."""
    stats: dict[str, Any] | None = None
    """Statistics from the loss kernel when ``LossOptions.return_stats``."""


class HeadOutput(NamedTuple):
    """Result of :meth:`MTPOutputHead.forward`."""

    hidden: torch.Tensor
    """[B, T, H, d] final-normed head states."""
    logits: torch.Tensor | None
    """[B, T, H, V] float32 logits when asked for."""
    loss: torch.Tensor | None
    """The loss when labels were given."""
    stats: dict[str, Any] | None
    """Loss statistics when asked for."""


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Meta's Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Set the gain to one."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of ``x`` (any leading shape)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Rotary(NamedTuple):
    """cos / sin of the rotary angles for given positions, [B or 1, T, 1, head_dim / 2], float32."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_inverse_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Meta's ``1 / theta ** (arange(0, hd, 2)[: hd // 2] / hd)`` in float32.

    Args:
        head_dim: attention head width (even).
        theta: RoPE base.
        device: where to build the tensor.

    Returns:
        [head_dim // 2] float32 frequencies.
    """
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """cos / sin of ``position * frequency`` (float32, same arithmetic as Meta's ``precompute_freqs_cis``).

    Computed per forward pass rather than stored, so there is no buffer to lose in ``to_empty`` or to
    be cast to bf16 by ``model.to(dtype)``; the cost is O(B T head_dim), negligible next to attention.

    Args:
        positions: [B, T] or [T] integer positions.
        head_dim: attention head width.
        theta: RoPE base.

    Returns:
        The tables, shaped to broadcast over [B, T, n_heads, head_dim / 2].
    """
    freqs = rope_inverse_frequencies(head_dim, theta, positions.device)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    angles = positions.float().unsqueeze(-1) * freqs  # [B, T, hd/2]
    return Rotary(torch.cos(angles).unsqueeze(2), torch.sin(angles).unsqueeze(2))


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate consecutive pairs (0,1), (2,3), ... of the last dim, Meta's complex-pair convention.

    Equivalent to ``view_as_real(view_as_complex(x.reshape(..., -1, 2)) * polar(1, angle))``, in real
    arithmetic (float32) so it also runs where complex kernels are missing.

    Args:
        x: [B, T, n_heads, head_dim].
        rotary: tables from :func:`rotary_tables`.

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack(
        (real * rotary.cos - imag * rotary.sin, real * rotary.sin + imag * rotary.cos), dim=-1
    )
    return rotated.flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat KV heads for grouped-query attention: query head i reads KV head i // n_rep.

    Args:
        x: [B, T, n_kv_heads, head_dim].
        n_rep: query heads per KV head.

    Returns:
        [B, T, n_kv_heads * n_rep, head_dim].
    """
    if n_rep == 1:
        return x
    bsz, seqlen, n_kv, head_dim = x.shape
    return (
        x.unsqueeze(3).expand(bsz, seqlen, n_kv, n_rep, head_dim).reshape(bsz, seqlen, n_kv * n_rep, head_dim)
    )


def attention_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, T, T]: causal, padded keys excluded, every query sees itself.

    Letting a padded query attend to itself keeps its softmax row non-empty (no NaN); real queries
    never see padded keys.

    Args:
        attention_mask: [B, T], nonzero for real tokens.

    Returns:
        True where the query (row) may attend to the key (column).
    """
    seqlen = attention_mask.shape[1]
    idx = torch.arange(seqlen, device=attention_mask.device)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)  # [T, T]
    diagonal = idx.unsqueeze(1) == idx.unsqueeze(0)
    real_keys = attention_mask.bool().unsqueeze(1)  # [B, 1, T]
    return (causal & (real_keys | diagonal)).unsqueeze(1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions ``cumsum(mask) - 1`` (clamped at 0 for left padding): [B, T] int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class Attention(nn.Module):
    """Multi-head attention with RoPE and grouped KV heads (Meta's ``wq, wk, wv, wo``, no biases).

    Positions come in precomputed (as rotary tables), so a KV cache can be added without touching
    the projection code.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self, x: torch.Tensor, rotary: Rotary, mask: torch.Tensor | None, kv_cache: Any = None
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: [B, T, d] normed input.
            rotary: rotary tables for the T positions.
            mask: boolean [B, 1, T, T] from :func:`attention_bias`, or None for plain causal attention.
                With ``kv_cache``: [B, 1, T, T_cached + T] over the cached keys then the new ones.
            kv_cache: optional decoding cache (``wmtp_train.inference.generation``) with
                ``update(k, v) -> (k_all, v_all)``, [B, T, n_kv_heads, head_dim] in and
                [B, T_cached + T, n_kv_heads, head_dim] out (rotated keys).

        Returns:
            [B, T, d].
        """
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP to [..., d]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: torch.Tensor, rotary: Rotary, mask: torch.Tensor | None, kv_cache: Any = None
    ) -> torch.Tensor:
        """Run the block on [B, T, d] (see :meth:`Attention.forward` for the other arguments)."""
        h = x + self.attention(self.attention_norm(x), rotary, mask, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, std: float, out_std: float) -> None:
        """Truncated-normal init; ``out_std`` for the projections that write into the residual stream."""
        for linear in (
            self.attention.wq,
            self.attention.wk,
            self.attention.wv,
            self.feed_forward.w1,
            self.feed_forward.w3,
        ):
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        for linear in (self.attention.wo, self.feed_forward.w2):
            nn.init.trunc_normal_(linear.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class ValueHead(nn.Module):
    """Critic V(s_t) from raw trunk states: its own RMSNorm, then an MLP or a linear map to one scalar.

    The last projection starts at zero, so V starts at sigmoid(0) = 0.5 (or 0 with ``"identity"``).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.squash = args.value_output == "sigmoid"
        if args.value_head == "mlp":
            self.hidden = nn.Linear(args.dim, args.dim)
            self.proj = nn.Linear(args.dim, 1)
        else:
            self.hidden = None
            self.proj = nn.Linear(args.dim, 1)

    def forward(self, trunk_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] raw trunk states -> [B, T, 1] values."""
        x = self.norm(trunk_hidden)
        if self.hidden is not None:
            x = F.silu(self.hidden(x))
        v = self.proj(x)
        return torch.sigmoid(v) if self.squash else v

    def init_weights(self) -> None:
        """Fresh init (also what a loaded Meta checkpoint gets)."""
        self.norm.reset_parameters()
        if self.hidden is not None:
            std = self.hidden.in_features**-0.5
            nn.init.trunc_normal_(self.hidden.weight, std=std, a=-3 * std, b=3 * std)
            nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class MTPOutputHead(nn.Module):
    """Shared final norm + unembedding of the H heads, and the weighted MTP loss on them.

    Everything that reads ``norm`` or ``output`` happens in :meth:`forward`, so that FSDP2 (which
    all-gathers a module's parameters around its ``forward``) hands the loss kernel full tensors.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(
        self,
        head_hidden_raw: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        loss_options: LossOptions | None = None,
        return_logits: bool = False,
    ) -> HeadOutput:
        """Normalise the head states and compute the loss (when ``labels``) and/or logits.

        Args:
            head_hidden_raw: [B, T, H, d] outputs of the head blocks.
            labels: [B, T] int64 targets (the input ids, prompt tokens set to ``ignore_index``);
                None skips the loss.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            weights: [B, T] per-token weights (SPEC §2: the prediction of x_{t+k} uses weights[t+k-1]).
            values: [B, T, 1] or [B, T] critic values, with ``rewards`` [B]: TD weights built in-kernel.
            rewards: [B] sequence rewards.
            loss_options: loss options (defaults: :class:`LossOptions`).
            return_logits: also return [B, T, H, V] float32 logits (materialised; for evaluation).

        Returns:
            :class:`HeadOutput`.
        """
        if head_hidden_raw.dim() != 4:
            raise ValueError(
                f"head_hidden_raw must be [B, T, H, d], got shape {tuple(head_hidden_raw.shape)}"
            )
        normed = self.norm(head_hidden_raw)
        logits = self.output(normed).float() if return_logits else None
        loss = stats = None
        if labels is not None:
            # Imported here so that building or loading a model never needs the kernels package.
            from wmtp_kernels import fused_weighted_mtp_loss
            from wmtp_kernels.reference import weighted_mtp_loss_from_hidden

            options = loss_options if loss_options is not None else LossOptions()
            kwargs = dataclasses.asdict(options)
            if kwargs.pop("implementation") == "fused":
                loss_fn = fused_weighted_mtp_loss
            else:
                loss_fn = weighted_mtp_loss_from_hidden
                del kwargs["check_finite"]  # False here (__post_init__); the reference has no such flag
            if values is not None and values.dim() == 3:
                values = values.squeeze(-1)
            result = loss_fn(
                normed,
                self.output.weight,
                labels,
                attention_mask,
                weights=weights,
                values=values,
                rewards=rewards,
                **kwargs,
            )
            loss, stats = result if options.return_stats else (result, None)
        return HeadOutput(normed, logits, loss, stats)

    def init_weights(self) -> None:
        """Unit norm gain; unembedding ~ N(0, 1/d) truncated at 3 sigma."""
        self.norm.reset_parameters()
        std = self.output.in_features**-0.5
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)


class MTPTransformer(nn.Module):
    """Meta's MTP Llama (shared trunk, H parallel head blocks, shared norm + unembedding) + value head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_future_tokens = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_trunk_layers + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_future_tokens - 1))
        self.head = MTPOutputHead(args)
        self.value_head = ValueHead(args)

    @property
    def head_blocks(self) -> list[TransformerBlock]:
        """The H head blocks in head order: head 1 is ``layers[-1]``, heads 2..H ``extra_heads``."""
        return [self.layers[-1], *self.extra_heads]

    def init_weights(self) -> None:
        """Initialise every parameter (call after ``to_empty`` on a meta-built model).

        The model keeps no buffers (RoPE tables are computed per forward), so nothing else needs
        restoring after ``to_empty``.
        """
        std = 0.02
        # Residual-writing projections scaled by the depth of the deepest path (trunk + one head).
        out_std = std / math.sqrt(2 * (self.args.n_trunk_layers + 1))
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for block in [*self.layers, *self.extra_heads]:
            block.init_weights(std, out_std)
        self.head.init_weights()
        self.value_head.init_weights()

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.shape[1] > self.args.max_seq_len:
            raise ValueError(
                f"input_ids has T={input_ids.shape[1]} tokens, more than max_seq_len={self.args.max_seq_len}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} "
                f"!= input_ids shape {tuple(input_ids.shape)}"
            )

    def _run_trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor | None]:
        self._check_inputs(input_ids, attention_mask)
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            mask = None
        else:
            positions = positions_from_mask(attention_mask)
            mask = attention_bias(attention_mask)
        rotary = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(input_ids)
        for block in self.layers[:-1]:
            h = block(h, rotary, mask)
        return h, rotary, mask

    def _run_heads(
        self, trunk: torch.Tensor, rotary: Rotary, mask: torch.Tensor | None, n_heads: int
    ) -> torch.Tensor:
        return torch.stack([block(trunk, rotary, mask) for block in self.head_blocks[:n_heads]], dim=2)

    def trunk_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> TrunkOutput:
        """Trunk states and values, no head blocks, no vocabulary projection.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).

        Returns:
            :class:`TrunkOutput` with ``hidden`` [B, T, d] (raw) and ``values`` [B, T, 1].
        """
        hidden, _, _ = self._run_trunk(input_ids, attention_mask)
        return TrunkOutput(hidden, self.value_head(hidden))

    def full_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        n_heads: int | None = None,
    ) -> ModelOutput:
        """All heads: normed head states, values, and logits when asked.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            return_logits: also compute [B, T, H, V] float32 logits.
            n_heads: run only the first ``n_heads`` heads (e.g. 1 for next-token generation);
                None runs all H.

        Returns:
            :class:`ModelOutput` with ``hidden`` [B, T, H', d], ``values`` [B, T, 1], ``logits``.
        """
        n_heads = self.n_future_tokens if n_heads is None else n_heads
        if not 1 <= n_heads <= self.n_future_tokens:
            raise ValueError(f"n_heads must be in [1, {self.n_future_tokens}], got {n_heads}")
        trunk, rotary, mask = self._run_trunk(input_ids, attention_mask)
        values = self.value_head(trunk)
        head_out = self.head(self._run_heads(trunk, rotary, mask, n_heads), return_logits=return_logits)
        return ModelOutput(values=values, hidden=head_out.hidden, logits=head_out.logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        loss_options: LossOptions | None = None,
    ) -> ModelOutput:
        """One training pass: trunk -> values -> head blocks -> weighted MTP loss.

        Token weights come from exactly one source: ``weights`` (e.g. Rho-1), or ``rewards``, in which
        case the kernel builds TD weights from the detached values (AWR / IQL: the policy loss does not
        train the critic), or neither, for uniform weights (the baseline).

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            labels: [B, T] targets, prompt tokens set to ``ignore_index``; None uses ``input_ids``.
            weights: [B, T] per-token weights.
            rewards: [B] sequence rewards (TD weights from ``values.detach()``).
            loss_options: loss options (defaults: :class:`LossOptions`).

        Returns:
            :class:`ModelOutput` with ``loss``, ``values`` [B, T, 1] (with grad, for the value loss),
            ``hidden`` [B, T, H, d] and ``stats`` when asked.
        """
        if weights is not None and rewards is not None:
            raise ValueError("pass either weights or rewards, not both")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        trunk, rotary, mask = self._run_trunk(input_ids, attention_mask)
        values = self.value_head(trunk)
        td_values = None
        if rewards is not None:
            td_values = values.detach()
        elif weights is None:
            weights = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        head_out = self.head(
            self._run_heads(trunk, rotary, mask, self.n_future_tokens),
            labels,
            attention_mask,
            weights=weights,
            values=td_values,
            rewards=rewards,
            loss_options=loss_options,
        )
        return ModelOutput(values=values, hidden=head_out.hidden, loss=head_out.loss, stats=head_out.stats)


def resolve_args(args_or_preset: ModelArgs | str) -> ModelArgs:
    """A :class:`ModelArgs` from itself or a preset name.

    Args:
        args_or_preset: model arguments or a key of :data:`PRESETS`.

    Returns:
        The arguments.
    """
    if isinstance(args_or_preset, ModelArgs):
        return args_or_preset
    if isinstance(args_or_preset, str):
        if args_or_preset not in PRESETS:
            raise ValueError(f"unknown model preset {args_or_preset!r}; presets are {sorted(PRESETS)}")
        return PRESETS[args_or_preset]
    raise TypeError(f"args_or_preset must be ModelArgs or a preset name, got {type(args_or_preset).__name__}")


def build_model(
    args_or_preset: ModelArgs | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MTPTransformer:
    """Build a model; initialised unless built on the meta device.

    On ``device="meta"`` no memory is allocated: shard it, then ``to_empty(device=...)`` and
    ``init_weights()``.

    Args:
        args_or_preset: model arguments or a preset name.
        device: where to allocate (default: the current default device).
        dtype: parameter dtype (default: the current default dtype).

    Returns:
        The model.
    """
    args = resolve_args(args_or_preset)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = MTPTransformer(args)
    if dtype is not None:
        model = model.to(dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
