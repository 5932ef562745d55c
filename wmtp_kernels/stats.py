"""Statistics of TD errors and token weights, and those returned with ``return_stats=True`` (production).

Moments are taken over the masked, finite entries in float64 with masked sums (no boolean indexing), and
each function reads its results back to the host once.
"""

from __future__ import annotations

import math

import torch

from wmtp_kernels.masks import applied_weight_mask
from wmtp_kernels.options import WeightingOptions
from wmtp_kernels.td_weights import token_weights


def _kept(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in float64 and the bool selection of its finite entries under ``mask``."""
    x = x.detach().to(torch.float64)
    keep = torch.isfinite(x)
    if mask is not None:
        if mask.shape != x.shape:
            raise ValueError(
                f"mask must have the shape of the statistic's input {list(x.shape)}, got {list(mask.shape)}"
            )
        keep = keep & mask.bool()
    return x, keep


def _moment_tensors(x: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """``[count, mean, std, min, max]`` (population std; zeros when nothing is kept)."""
    count = keep.sum().to(x.dtype)
    n = count.clamp(min=1)
    mean = torch.where(keep, x, 0.0).sum() / n
    std = (torch.where(keep, x - mean, 0.0).square().sum() / n).sqrt()
    low = torch.where(keep, x, math.inf).amin() if x.numel() else count
    high = torch.where(keep, x, -math.inf).amax() if x.numel() else count
    some = count > 0
    return [count, mean, std, torch.where(some, low, 0.0), torch.where(some, high, 0.0)]


def _named(prefix: str, moments: list[float]) -> dict[str, float]:
    return dict(zip((f"{prefix}_mean", f"{prefix}_std", f"{prefix}_min", f"{prefix}_max"), moments))


def compute_td_stats(td_errors: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean, (population) std, min and max of the TD errors over the masked, finite entries.

    NaN / Inf entries are skipped, never raised; with no entry left every statistic is 0.

    Args:
        td_errors: TD errors of any shape.
        mask: Optional mask of the same shape; nonzero entries are included.

    Returns:
        ``{"td_mean", "td_std", "td_min", "td_max"}`` as Python floats.
    """
    x, keep = _kept(td_errors, mask)
    return _named("td", torch.stack(_moment_tensors(x, keep)[1:]).tolist())


def compute_weight_stats(weights: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Moments of the weights and the normalised entropy of ``p = w / sum(w)``.

    The entropy is divided by ``log(n)`` so that 1 means uniform weights (a single entry counts as
    uniform; no entry, or a non-positive sum, gives 0). NaN / Inf entries are skipped.

    Args:
        weights: Non-negative token weights of any shape.
        mask: Optional mask of the same shape; nonzero entries are included.

    Returns:
        ``{"weight_mean", "weight_std", "weight_min", "weight_max", "weight_entropy"}`` as floats.
    """
    x, keep = _kept(weights, mask)
    moments = _moment_tensors(x, keep)
    total = torch.where(keep, x, 0.0).sum()
    p = torch.where(keep, x.clamp(min=0), 0.0) / total.clamp(min=torch.finfo(x.dtype).tiny)
    count, *rest = torch.stack([*moments, -torch.special.xlogy(p, p).sum(), total]).tolist()
    *moment_values, entropy_sum, total_value = rest
    stats = _named("weight", moment_values)
    if count == 0 or total_value <= 0:
        stats["weight_entropy"] = 0.0
    elif count == 1:
        stats["weight_entropy"] = 1.0
    else:
        stats["weight_entropy"] = entropy_sum / math.log(count)
    return stats


def loss_stats(
    head_ce: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    weighting: WeightingOptions,
    ignore_index: int,
) -> dict[str, float]:
    """The statistics of ``return_stats=True``, with the keys and definitions of the reference.

    Per-head mean cross-entropy comes from the loss's own pass; weight and TD statistics from the
    ``[B, T]`` token weights (rebuilt from the values when given: ``O(B * T)``), over the positions of
    :func:`wmtp_kernels.masks.applied_weight_mask`.

    Args:
        head_ce: ``[H]`` mean unweighted cross-entropy of the valid predictions of each head.
        labels: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` mask or ``None``.
        weights: ``[B, T]`` token weights or ``None``.
        values: Critic values or ``None``.
        rewards: Rewards or ``None``.
        weighting: TD and weighting options.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``{"ce_head1", ..., "weight_mean", ..., "td_mean", ...}`` as floats (``td_*`` only with values).
    """
    stats = {f"ce_head{k}": ce for k, ce in enumerate(head_ce.tolist(), 1)}
    like = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    with torch.no_grad():
        token_w, td = token_weights(weights, values, rewards, attention_mask, like, weighting)
    applied = applied_weight_mask(labels, attention_mask, ignore_index)
    stats.update(compute_weight_stats(token_w, applied))
    if td is not None:
        stats.update(compute_td_stats(td, applied))
    return stats
