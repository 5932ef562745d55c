"""Plain PyTorch reference for every WMTP computation: the ground truth of the parity tests.

Written for readability, not speed: it materialises logits and per-head cross-entropies. Every function
computes in the dtype it is given, so a test can call it in float64 for a ground truth and in the input
dtype for the error a plain PyTorch implementation makes. It shares no computation with the production
code it checks (it imports only the input checks and the options); the production functions it mirrors
document the arguments, and ``docs/DESIGN.md`` the math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wmtp_kernels._validation import (
    batch_and_seq,
    check_float,
    check_hidden_inputs,
    check_logits_inputs,
    check_mask,
    check_values_rewards,
)
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.last_token_index`: ``[B]`` last real token index, ``-1`` if none."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)


def _squeeze_values(values: torch.Tensor) -> torch.Tensor:
    return values.squeeze(-1) if values.dim() == 3 else values


def compute_td_errors(
    values: torch.Tensor,
    rewards: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    terminal: str = "last_state",
) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.compute_td_errors` (same arguments): shifted-tensor TD errors.

    ``td[t] = gamma * V[t+1] - V[t]`` where t and t+1 are real and t < last; ``last_state``:
    ``td[last] = R - V[last]``; ``last_transition``: ``td[last-1] = R - V[last-1]``, ``td[last] = 0``.
    Padding is 0. Differentiable in values and rewards.
    """
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(attention_mask, batch, seq)
    WeightingOptions(gamma=gamma, terminal=terminal)
    v = _squeeze_values(values)
    real = torch.ones_like(v, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    last = last_token_index(real)[:, None]
    positions = torch.arange(seq, device=v.device)[None, :]

    bootstrap = gamma * v[:, 1:] - v[:, :-1]
    both_real = real[:, 1:] & real[:, :-1] & (positions[:, :-1] < last)
    td = F.pad(torch.where(both_real, bootstrap, torch.zeros_like(bootstrap)), (0, 1))

    outcome = rewards.to(v.dtype)[:, None] - v
    if terminal == "last_state":
        td = torch.where(positions == last, outcome, td)
    else:
        td = torch.where(positions == last - 1, outcome, td)
        td = torch.where(positions == last, torch.zeros_like(td), td)
    return torch.where(real, td, torch.zeros_like(td))


def build_weights(
    td_errors: torch.Tensor, beta: float = 0.9, min_weight: float = 0.1, max_weight: float = 5.0
) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.build_weights`: ``clamp(exp(td / beta), min_weight, max_weight)``."""
    check_float("td_errors", td_errors)
    WeightingOptions(beta=beta, min_weight=min_weight, max_weight=max_weight)
    return torch.clamp(torch.exp(td_errors / beta), min=min_weight, max=max_weight)


def _finite_selection(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.detach().to(torch.float64)
    keep = torch.isfinite(x)
    if mask is not None:
        if mask.shape != x.shape:
            raise ValueError(
                f"mask must have the shape of the statistic's input {list(x.shape)}, got {list(mask.shape)}"
            )
        keep &= mask.bool()
    return x[keep]


def _moments(x: torch.Tensor, prefix: str) -> dict[str, float]:
    if x.numel() == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_std": 0.0, f"{prefix}_min": 0.0, f"{prefix}_max": 0.0}
    return {
        f"{prefix}_mean": x.mean().item(),
        f"{prefix}_std": x.std(unbiased=False).item(),
        f"{prefix}_min": x.min().item(),
        f"{prefix}_max": x.max().item(),
    }


def compute_td_stats(td_errors: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Oracle of :func:`wmtp_kernels.compute_td_stats`: moments over the masked, finite entries."""
    return _moments(_finite_selection(td_errors, mask), "td")


def compute_weight_stats(weights: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Oracle of :func:`wmtp_kernels.compute_weight_stats`: moments and entropy / log(n)."""
    w = _finite_selection(weights, mask)
    stats = _moments(w, "weight")
    total = w.sum()
    if w.numel() == 0 or total.item() <= 0:
        stats["weight_entropy"] = 0.0
    elif w.numel() == 1:
        stats["weight_entropy"] = 1.0
    else:
        p = w.clamp(min=0) / total
        stats["weight_entropy"] = (-torch.special.xlogy(p, p).sum() / math.log(w.numel())).item()
    return stats


def resolve_token_weights(
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    like: torch.Tensor,
    options: WeightingOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` token weights from ``weights``, or from values + rewards (then also the TD errors), or ones.

    Oracle of ``wmtp_kernels.td_weights.token_weights`` (same arguments).
    """
    if weights is not None:
        return weights, None
    if values is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device), None
    td = compute_td_errors(values, rewards, attention_mask, options.gamma, options.terminal)
    return build_weights(td, options.beta, options.min_weight, options.max_weight), td


def head_valid_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, k: int, ignore_index: int
) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.head_valid_mask`: ``[B, max(T - k, 0)]`` bool valid predictions."""
    seq = labels.shape[1]
    valid = labels[:, k:] != ignore_index
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = valid & real[:, : max(seq - k, 0)] & real[:, k:]
    return valid


def _weighted_mtp_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_weights: torch.Tensor,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Loss plus per-head unweighted CE sums and valid counts (for statistics)."""
    batch, seq, heads, vocab = logits.shape
    per_position = logits.new_zeros(batch, seq, heads)
    numerators, ce_sums, counts = [], [], []
    for k in range(1, heads + 1):
        valid = head_valid_mask(labels, attention_mask, k, ignore_index)
        if seq - k <= 0:
            zero = logits.new_zeros(())
            numerators.append(zero)
            ce_sums.append(zero)
            counts.append(zero)
            continue
        targets = torch.where(valid, labels[:, k:], torch.zeros_like(labels[:, k:]))
        ce = F.cross_entropy(
            logits[:, : seq - k, k - 1].reshape(-1, vocab), targets.reshape(-1), reduction="none"
        ).view(batch, seq - k)
        ce = torch.where(valid, ce, torch.zeros_like(ce))
        weighted = ce * token_weights[:, k - 1 : seq - 1].to(ce.dtype)
        per_position[:, : seq - k, k - 1] = weighted
        numerators.append(weighted.sum())
        ce_sums.append(ce.sum())
        counts.append(valid.sum().to(ce.dtype))
    if reduction == "none":
        loss = per_position
    elif reduction == "sum":
        loss = torch.stack(numerators).sum()
    else:
        loss = torch.stack([n / c.clamp(min=1) for n, c in zip(numerators, counts)]).mean()
    return loss, ce_sums, counts


def _loss_stats(
    ce_sums: list[torch.Tensor],
    counts: list[torch.Tensor],
    token_weights: torch.Tensor,
    td: torch.Tensor | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    ignore_index: int,
) -> dict[str, float]:
    stats = {f"ce_head{k}": (s / c.clamp(min=1)).item() for k, (s, c) in enumerate(zip(ce_sums, counts), 1)}
    applied = applied_weight_mask(labels, attention_mask, ignore_index)
    stats.update(compute_weight_stats(token_weights, applied))
    if td is not None:
        stats.update(compute_td_stats(td, applied))
    return stats


def applied_weight_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.applied_weight_mask`: head 1's valid positions as ``[B, T]``."""
    return F.pad(head_valid_mask(labels, attention_mask, 1, ignore_index), (0, 1), value=False)


def weighted_mtp_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    beta: float = 0.9,
    min_weight: float = 0.1,
    max_weight: float = 5.0,
    terminal: str = "last_state",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """H-offset weighted multi-token cross-entropy from logits (docs/DESIGN.md "§ H-offset alignment").

    Head k (1..H) at position t predicts ``labels[t + k]`` with weight ``weights[t + k - 1]``; a
    prediction is valid when both positions are real and the label is not ``ignore_index``.
    ``mean``: per head, weighted CE summed over valid predictions / max(#valid, 1), then mean over all
    H heads. ``sum``: the sum of those numerators. ``none``: ``[B, T, H]`` weighted CE at the prediction
    position, zero where not valid.

    Args:
        logits: ``[B, T, H, V]``.
        labels: ``[B, T]`` int token ids (the input ids, prompt tokens set to ``ignore_index``).
        attention_mask: ``[B, T]``, nonzero for real tokens; ``None`` means all real.
        weights: ``[B, T]`` token weights; or give ``values`` and ``rewards``; neither means uniform.
        values: ``[B, T(, 1)]`` critic values for in-loss TD weights (differentiable if they require grad).
        rewards: ``[B]`` sequence rewards, with ``values``.
        gamma: TD discount.
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention, ``"last_state"`` or ``"last_transition"``.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        return_stats: Also return per-head unweighted CE and weight (and TD) statistics.

    Returns:
        The loss (scalar, or ``[B, T, H]`` for ``none``), in the dtype of ``logits``; with
        ``return_stats`` a tuple ``(loss, stats)``.
    """
    check_logits_inputs(logits, labels, attention_mask, weights, values, rewards, ignore_index, reduction)
    options = WeightingOptions(gamma, beta, min_weight, max_weight, terminal)
    token_weights, td = resolve_token_weights(weights, values, rewards, attention_mask, logits, options)
    loss, ce_sums, counts = _weighted_mtp_from_logits(
        logits, labels, attention_mask, token_weights, ignore_index, reduction
    )
    if not return_stats:
        return loss
    return loss, _loss_stats(ce_sums, counts, token_weights, td, labels, attention_mask, ignore_index)


def weighted_mtp_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    beta: float = 0.9,
    min_weight: float = 0.1,
    max_weight: float = 5.0,
    terminal: str = "last_state",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """The linear-fused loss's reference: ``logits = hidden @ W.T (+ b)``, then the weighted MTP CE.

    Args:
        hidden: ``[B, T, H, d]`` final-normed hidden states of the H heads.
        lm_head_weight: ``[V, d]`` shared unembedding.
        labels: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` mask or ``None``.
        weights: ``[B, T]`` token weights (or ``values`` + ``rewards``, or neither for uniform).
        values: ``[B, T(, 1)]`` critic values.
        rewards: ``[B]`` rewards.
        gamma: TD discount.
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        return_stats: Also return statistics (see :func:`weighted_mtp_cross_entropy`).
        lm_head_bias: Optional ``[V]`` bias.

    Returns:
        As :func:`weighted_mtp_cross_entropy`.
    """
    check_hidden_inputs(
        hidden,
        lm_head_weight,
        lm_head_bias,
        labels,
        attention_mask,
        weights,
        values,
        rewards,
        ignore_index,
        reduction,
    )
    dtype = torch.promote_types(hidden.dtype, lm_head_weight.dtype)  # float32 weight under autocast
    bias = None if lm_head_bias is None else lm_head_bias.to(dtype)
    logits = F.linear(hidden.to(dtype), lm_head_weight.to(dtype), bias)
    return weighted_mtp_cross_entropy(
        logits,
        labels,
        attention_mask,
        weights,
        values,
        rewards,
        gamma,
        beta,
        min_weight,
        max_weight,
        terminal,
        ignore_index,
        reduction,
        return_stats,
    )


def value_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
    loss_type: str = "mse",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Oracle of :func:`wmtp_kernels.value_loss` (same arguments): masked mean of the critic's regression.

    With ``old_values`` and ``clip_range``: ``max(l(V, R), l(V_old + clamp(V - V_old, -c, c), R))``.
    """
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(mask, batch, seq)
    if loss_type not in ("mse", "huber"):
        raise ValueError(f"loss_type must be 'mse' or 'huber', got {loss_type!r}")
    v = _squeeze_values(values)
    target = rewards.to(v.dtype)[:, None].expand_as(v)

    def pointwise(x: torch.Tensor) -> torch.Tensor:
        if loss_type == "mse":
            return (x - target) ** 2
        return F.huber_loss(x, target, reduction="none", delta=huber_delta)

    per_token = pointwise(v)
    if old_values is not None and clip_range is not None:
        if old_values.shape != values.shape:
            raise ValueError(
                f"old_values must have the shape of values {list(values.shape)}, got {list(old_values.shape)}"
            )
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        old = _squeeze_values(old_values).detach()
        clipped = old + torch.clamp(v - old, -clip_range, clip_range)
        per_token = torch.maximum(per_token, pointwise(clipped))
    if mask is None:
        return per_token.mean()
    m = mask.to(v.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def explained_variance(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """Oracle of :func:`wmtp_kernels.explained_variance`: ``1 - Var(R - V) / Var(R)`` (NaN if Var(R) = 0)."""
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(mask, batch, seq)
    v = _squeeze_values(values).detach().to(torch.float64)
    target = rewards.detach().to(torch.float64)[:, None].expand_as(v)
    keep = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.bool()
    r, residual = target[keep], (target - v)[keep]
    var_r = r.var(unbiased=False) if r.numel() else torch.tensor(0.0)
    if r.numel() == 0 or var_r.item() <= 0:
        return float("nan")
    return (1 - residual.var(unbiased=False) / var_r).item()


__all__ = [
    "IGNORE_INDEX",
    "applied_weight_mask",
    "build_weights",
    "compute_td_errors",
    "compute_td_stats",
    "compute_weight_stats",
    "explained_variance",
    "head_valid_mask",
    "last_token_index",
    "resolve_token_weights",
    "value_loss",
    "weighted_mtp_cross_entropy",
    "weighted_mtp_loss_from_hidden",
]
