"""The Llama blocks of the MTP model: RMSNorm, rotary embeddings, grouped-query attention and SwiGLU.

Padding: ``attention_mask[b, t] = 1`` marks real tokens. Attention ignores padded keys and RoPE positions
are ``cumsum(mask) - 1``, so a sequence gives the same hidden states on its real tokens whether it is
left- or right-padded. Padded queries attend to themselves only (never a NaN row).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_train.model.args import ModelArgs


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
            kv_cache: optional decoding cache (``wmtp_train.inference.kv_cache``) with
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
        if x.device.type == "cpu":
            # The CPU flash-attention kernel is 1.2-2.3x slower in bf16 than in fp32 at head_dim 32 (T 384-64,
            # fwd + bwd: benchmarks/bench_attention_cpu.py), so on the CPU attention runs in fp32.
            q, k, v = q.float(), k.float(), v.float()
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1).type_as(x))


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
