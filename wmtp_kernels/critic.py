"""The critic's regression loss and its explained variance (production; the trainer uses these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_kernels._validation import batch_and_seq, check_mask, check_values_rewards

LOSS_TYPES = ("mse", "huber")


def _regression(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, delta: float) -> torch.Tensor:
    if loss_type == "huber":
        return F.huber_loss(prediction, target.expand_as(prediction), reduction="none", delta=delta)
    return (prediction - target).square()


def value_loss(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    clip_range: float | None = None,
    loss_type: str = "mse",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Critic regression of V(s_t) onto the sequence reward over the masked tokens, optionally clipped.

    With ``old_values`` and ``clip_range`` (PPO style): ``V_clip = clamp(V, V_old - c, V_old + c)`` and
    the per-token loss is ``max(l(V, R), l(V_clip, R))``, so moving V further than ``c`` from ``V_old``
    earns no gradient. ``V_old`` is whatever the caller snapshots (the trainer: a lagged copy of the
    value head applied to the detached trunk states).

    Args:
        values: ``[B, T]`` or ``[B, T, 1]``.
        rewards: ``[B]``, broadcast over each row.
        mask: ``[B, T]`` tokens that count; ``None`` means all.
        old_values: Reference values of the shape of ``values`` for clipping, or ``None``.
        clip_range: The clip ``c`` > 0, or ``None`` for no clipping.
        loss_type: ``"mse"`` (squared error) or ``"huber"`` (smooth L1 with ``huber_delta``).
        huber_delta: Huber transition point.

    Returns:
        Scalar: the masked mean of the per-token loss (0 when the mask is empty).
    """
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(mask, batch, seq)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    v = values.reshape(batch, seq)
    target = rewards.to(v.dtype)[:, None]
    per_token = _regression(v, target, loss_type, huber_delta)
    if old_values is not None and clip_range is not None:
        if old_values.shape != values.shape:
            raise ValueError(
                f"old_values must have the shape of values {list(values.shape)}, got {list(old_values.shape)}"
            )
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        old = old_values.detach().reshape(batch, seq).to(v.dtype)
        clipped = torch.clamp(v, old - clip_range, old + clip_range)
        per_token = torch.maximum(per_token, _regression(clipped, target, loss_type, huber_delta))
    counts = torch.ones_like(v) if mask is None else mask.to(v.dtype)
    return (per_token * counts).sum() / counts.sum().clamp(min=1)


def explained_variance(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens (R broadcast over each row).

    Args:
        values: ``[B, T]`` or ``[B, T, 1]``.
        rewards: ``[B]``.
        mask: ``[B, T]`` tokens that count; ``None`` means all.

    Returns:
        The explained variance as a float; NaN when the rewards have no variance over the mask.
    """
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(mask, batch, seq)
    v = values.detach().reshape(batch, seq).to(torch.float64)
    target = rewards.detach().to(torch.float64)[:, None].expand(batch, seq)
    keep = torch.ones_like(v) if mask is None else mask.bool().to(torch.float64)
    n = keep.sum().clamp(min=1)

    def variance(x: torch.Tensor) -> torch.Tensor:
        mean = (x * keep).sum() / n
        return ((x - mean).square() * keep).sum() / n

    var_r, var_residual = torch.stack([variance(target), variance(target - v)]).tolist()
    if var_r <= 0:
        return float("nan")
    return 1 - var_residual / var_r
