"""An independent re-implementation of Meta's MTP Llama forward, straight from a consolidated state dict.

Written the way Meta's reference code computes it (complex RoPE via ``view_as_complex``/``polar``,
KV heads repeated per query group, explicit softmax attention), sharing no code with
``wmtp_train.model.mtp``, so agreement checks key mapping, rotary convention, GQA and head wiring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, device=freqs.device)
    angles = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(angles), angles)  # [end, head_dim / 2] complex64


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's convention. x: [B, T, heads, hd]; freqs_cis: [T, hd/2] or [B, T, hd/2]."""
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    freqs = freqs_cis.unsqueeze(-2)  # broadcast over heads
    if freqs.dim() == 3:
        freqs = freqs.unsqueeze(0)
    return torch.view_as_real(x_ * freqs).flatten(3).type_as(x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _block(sd: dict, prefix: str, x: torch.Tensor, freqs_cis: torch.Tensor, params: dict) -> torch.Tensor:
    bsz, seqlen, dim = x.shape
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    eps = params["norm_eps"]
    h = _rms_norm(x, sd[f"{prefix}.attention_norm.weight"], eps)
    q = (h @ sd[f"{prefix}.attention.wq.weight"].T).view(bsz, seqlen, n_heads, hd)
    k = (h @ sd[f"{prefix}.attention.wk.weight"].T).view(bsz, seqlen, n_kv, hd)
    v = (h @ sd[f"{prefix}.attention.wv.weight"].T).view(bsz, seqlen, n_kv, hd)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    k = torch.repeat_interleave(k, n_heads // n_kv, dim=2)
    v = torch.repeat_interleave(v, n_heads // n_kv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / hd**0.5
    causal = torch.full((seqlen, seqlen), float("-inf")).triu(1)
    attn = F.softmax(scores.float() + causal, dim=-1).type_as(q) @ v
    x = x + attn.transpose(1, 2).reshape(bsz, seqlen, dim) @ sd[f"{prefix}.attention.wo.weight"].T
    h = _rms_norm(x, sd[f"{prefix}.ffn_norm.weight"], eps)
    ffn = f"{prefix}.feed_forward"
    gate = F.silu(h @ sd[f"{ffn}.w1.weight"].T) * (h @ sd[f"{ffn}.w3.weight"].T)
    return x + gate @ sd[f"{prefix}.feed_forward.w2.weight"].T


def meta_forward_logits(sd: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] tokens -> [B, T, H, V] float logits, all heads (Meta's ``return_all_heads=True``)."""
    n_future = params.get("n_future_tokens", 1)
    n_layers = params["n_layers"]
    hd = params["dim"] // params["n_heads"]
    freqs_cis = precompute_freqs_cis(hd, tokens.shape[1], params.get("rope_theta", 10000.0))
    h = sd["tok_embeddings.weight"][tokens]
    n_blocks = n_layers - n_future + 1
    for i in range(n_blocks - 1):
        h = _block(sd, f"layers.{i}", h, freqs_cis, params)
    heads = [f"layers.{n_blocks - 1}"] + [f"extra_heads.{j}" for j in range(n_future - 1)]
    latents = torch.stack([_block(sd, prefix, h, freqs_cis, params) for prefix in heads], dim=-2)
    normed = _rms_norm(latents, sd["norm.weight"], params["norm_eps"])
    return (normed @ sd["output.weight"].T).float()


def random_meta_state_dict(params: dict, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A state dict with exactly Meta's keys (and ``rope.freqs``, as the releases have) for ``params``."""
    gen = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])
    n_future = params.get("n_future_tokens", 1)

    def rand(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def block(prefix):
        return {
            f"{prefix}.attention.wq.weight": rand(n_heads * hd, dim),
            f"{prefix}.attention.wk.weight": rand(n_kv * hd, dim),
            f"{prefix}.attention.wv.weight": rand(n_kv * hd, dim),
            f"{prefix}.attention.wo.weight": rand(dim, n_heads * hd),
            f"{prefix}.feed_forward.w1.weight": rand(hidden, dim),
            f"{prefix}.feed_forward.w2.weight": rand(dim, hidden),
            f"{prefix}.feed_forward.w3.weight": rand(hidden, dim),
            f"{prefix}.attention_norm.weight": 1 + rand(dim),
            f"{prefix}.ffn_norm.weight": 1 + rand(dim),
        }

    sd = {"tok_embeddings.weight": rand(params["vocab_size"], dim, scale=1.0)}
    for i in range(params["n_layers"] - n_future + 1):
        sd.update(block(f"layers.{i}"))
    for j in range(n_future - 1):
        sd.update(block(f"extra_heads.{j}"))
    sd["norm.weight"] = 1 + rand(dim)
    sd["output.weight"] = rand(params["vocab_size"], dim)
    sd["rope.freqs"] = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    return sd
