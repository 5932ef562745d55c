"""What a training step logs, pooled over its micro-batches and all ranks.

Every metric is one number per optimizer step, computed over all the tokens of the step on all ranks, so
it does not depend on how the global batch is split into ranks and micro-batches:

- ``total_loss``, ``mtp_loss``, ``value_loss``: the step's losses (global token means, see
  :mod:`wmtp_train.train.step`).
- ``ce_head{k}``: head k's unweighted cross-entropy, the mean over its valid predictions of the step.
- ``weight_mean`` / ``weight_std`` / ``td_mean`` / ``td_std``: pooled moments over the positions whose
  weight is applied (head 1's valid predictions): the mean is ``sum / count`` and the population std
  ``sqrt(sum_sq / count - mean²)``, from the count, sum and sum of squares added over micro-batches and
  ranks. ``weight_min`` / ``weight_max`` / ``td_min`` / ``td_max``: the true extremes (all-reduced with
  MIN). ``weight_entropy``: the entropy of ``p = w / sum(w)`` over the same positions divided by
  ``log(count)`` (1 = uniform), pooled exactly from each micro-batch's count, mean and entropy.
- ``explained_variance``: ``1 - Var(R - V) / Var(R)`` over the step's completion tokens (NaN when the
  step's rewards are all equal). ``explained_variance_ema``: see :class:`RunningExplainedVariance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wmtp_kernels import IGNORE_INDEX, count_mtp_targets
from wmtp_train.eval.metrics import ev_moments, explained_variance_from_moments
from wmtp_train.train.parallelize import all_reduce

_MOMENT_PREFIXES = ("weight", "td")


def prediction_counts(
    labels: torch.Tensor, attention_mask: torch.Tensor, n_heads: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Valid predictions of each head; head 1's count is also the number of applied token weights.

    Args:
        labels: [B, T] targets (``ignore_index`` where not trained).
        attention_mask: [B, T], 1 for real tokens.
        n_heads: H.
        ignore_index: ignored label value.

    Returns:
        float64 [H] on the CPU.
    """
    return count_mtp_targets(labels, attention_mask, n_heads, ignore_index).double().cpu()


@dataclass(frozen=True)
class ReducedStep:
    """A step's statistics after the all-reduce."""

    sums: dict[str, float]
    """Every value given to :meth:`StepStats.add`, summed."""
    explained_variance_moments: torch.Tensor
    """The summed :func:`~wmtp_train.eval.metrics.ev_moments` (zeros when no values were added)."""
    loss_stats: dict[str, float]
    """Pooled ``ce_head{k}``, weight and TD statistics (module docstring); empty without loss stats."""


class StepStats:
    """Collects one step's statistics over its micro-batches, then reduces them over the ranks.

    Every rank must add the same keys (the same recipe does) and call :meth:`reduce` together.
    """

    def __init__(self) -> None:
        self._sums: dict[str, float | torch.Tensor] = {}
        self._lows: dict[str, float] = {}  # minima, and maxima negated, for one MIN all-reduce
        self._moments = torch.zeros(5, dtype=torch.float64)

    def add(self, **values: float | torch.Tensor) -> None:
        """Add values to the step's sums (tensors are detached and summed in float64 where they are: they
        are read only by :meth:`reduce`, so adding never waits for the device)."""
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
            self._sums[key] = self._sums.get(key, 0.0) + value

    def add_critic(self, values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a micro-batch's values against its rewards over ``mask`` (the explained variance)."""
        self._moments += ev_moments(values, rewards, mask).cpu()

    def add_loss_stats(self, stats: dict[str, float], head_counts: torch.Tensor) -> None:
        """Add the statistics the loss returned for one micro-batch (``return_stats=True``).

        Args:
            stats: ``ce_head{k}`` and ``weight_*`` (and ``td_*``) of the micro-batch.
            head_counts: :func:`prediction_counts` of the micro-batch.
        """
        counts = head_counts.tolist()
        for k, count in enumerate(counts, start=1):
            self.add(**{f"ce_head{k}.count": count, f"ce_head{k}.sum": stats[f"ce_head{k}"] * count})
        applied = counts[0]
        for prefix in _MOMENT_PREFIXES:
            if f"{prefix}_mean" not in stats:
                continue
            mean, std = stats[f"{prefix}_mean"], stats[f"{prefix}_std"]
            self.add(
                **{
                    f"{prefix}.count": applied,
                    f"{prefix}.sum": mean * applied,
                    f"{prefix}.sum_sq": (std**2 + mean**2) * applied,
                }
            )
            low, high = (stats[f"{prefix}_min"], stats[f"{prefix}_max"]) if applied else (math.inf, -math.inf)
            self._lows[f"{prefix}_min"] = min(self._lows.get(f"{prefix}_min", math.inf), low)
            self._lows[f"{prefix}_max"] = min(self._lows.get(f"{prefix}_max", math.inf), -high)
        if "weight_entropy" in stats:
            # The micro-batch's sum of w log w, from its normalised entropy H = (log S - sum(w log w) / S)
            # / log n with S = sum(w) = mean * n; these sums pool into the step's entropy exactly.
            total = stats["weight_mean"] * applied
            w_log_w = 0.0
            if total > 0:
                w_log_w = total * (math.log(total) - stats["weight_entropy"] * math.log(applied))
            self.add(**{"weight.w_log_w": w_log_w})

    def reduce(self, device: torch.device) -> ReducedStep:
        """All-reduce (collective) and pool.

        Args:
            device: the training device.

        Returns:
            The reduced step.
        """
        keys = sorted(self._sums)
        sums = all_reduce(
            torch.tensor([float(self._sums[k]) for k in keys] + self._moments.tolist(), dtype=torch.float64),
            device,
        )
        low_keys = sorted(self._lows)
        lows = all_reduce(
            torch.tensor([self._lows[k] for k in low_keys], dtype=torch.float64), device, dist.ReduceOp.MIN
        )
        summed = dict(zip(keys, sums[: len(keys)].tolist()))
        extremes = dict(zip(low_keys, lows.tolist()))
        return ReducedStep(summed, sums[len(keys) :], _pool(summed, extremes))


def _pool(sums: dict[str, float], lows: dict[str, float]) -> dict[str, float]:
    stats: dict[str, float] = {}
    k = 1
    while f"ce_head{k}.count" in sums:
        stats[f"ce_head{k}"] = sums[f"ce_head{k}.sum"] / max(sums[f"ce_head{k}.count"], 1.0)
        k += 1
    for prefix in _MOMENT_PREFIXES:
        count = sums.get(f"{prefix}.count")
        if count is None:
            continue
        if count == 0:
            stats.update({f"{prefix}_{name}": 0.0 for name in ("mean", "std", "min", "max")})
            continue
        mean = sums[f"{prefix}.sum"] / count
        stats[f"{prefix}_mean"] = mean
        stats[f"{prefix}_std"] = math.sqrt(max(sums[f"{prefix}.sum_sq"] / count - mean**2, 0.0))
        stats[f"{prefix}_min"] = lows[f"{prefix}_min"]
        stats[f"{prefix}_max"] = -lows[f"{prefix}_max"]
    if "weight.w_log_w" in sums:
        count, total = sums["weight.count"], sums["weight.sum"]
        if count == 0 or total <= 0:
            stats["weight_entropy"] = 0.0
        elif count == 1:
            stats["weight_entropy"] = 1.0
        else:
            stats["weight_entropy"] = (math.log(total) - sums["weight.w_log_w"] / total) / math.log(count)
    return stats


class RunningExplainedVariance:
    """The explained variance of exponentially weighted moments, for the progress line.

    A step whose rewards are all equal has no explained variance of its own (NaN). This keeps the five
    :func:`~wmtp_train.eval.metrics.ev_moments` sums as an exponential moving average over steps,
    ``m <- decay * m + m_step``, and reports ``1 - Var(R - V) / Var(R)`` of those moments: the explained
    variance of the recent steps' tokens, each step weighing ``decay`` times less than the one after it.
    It is NaN only until a step with reward variance has been seen.

    Args:
        decay: weight of the history per step, in [0, 1).
    """

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.moments = torch.zeros(5, dtype=torch.float64)

    def update(self, step_moments: torch.Tensor) -> float:
        """Fold in one step's summed moments.

        Args:
            step_moments: the step's five sums.

        Returns:
            The running explained variance.
        """
        self.moments = self.decay * self.moments + step_moments.double().cpu()
        return explained_variance_from_moments(self.moments)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments (checkpointed, so a resumed run logs the same values)."""
        return {"moments": self.moments}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.moments = state["moments"].double().cpu()
