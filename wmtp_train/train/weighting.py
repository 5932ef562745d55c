"""Token bookkeeping for the trainer: loss normalisers, Rho-1 weights, explained-variance moments.

Index convention (SPEC §2): ``weights[b, j]`` weighs every head's prediction of token ``j + 1``; head k
predicts token ``j + 1`` from position ``j + 1 - k``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wmtp_kernels.reference import applied_weight_mask, head_valid_mask


def valid_prediction_count(
    labels: torch.Tensor, attention_mask: torch.Tensor, n_heads: int, ignore_index: int = -100
) -> torch.Tensor:
    """Number of valid (head, position) predictions, summed over the H heads.

    Args:
        labels: [B, T] targets (``ignore_index`` where not trained).
        attention_mask: [B, T], 1 for real tokens.
        n_heads: H.
        ignore_index: ignored label value.

    Returns:
        0-d float64 tensor.
    """
    total = sum(head_valid_mask(labels, attention_mask, k, ignore_index).sum() for k in range(1, n_heads + 1))
    return torch.as_tensor(total, dtype=torch.float64)


def excess_loss_scores(
    ce_model: torch.Tensor,
    ce_reference: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    score: str = "mean_heads",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Rho-1 excess loss per weight index j (the token j + 1): current CE minus reference CE.

    ``mean_heads``: the mean over the heads k whose prediction of token j + 1 (made at position
    j + 1 - k) is valid; ``next_token``: head 1's alone (position j).

    Args:
        ce_model: [B, T, H] per-position per-head CE of the trained model (``reduction="none"``).
        ce_reference: the same for the reference model.
        labels: [B, T] targets.
        attention_mask: [B, T].
        score: ``mean_heads`` or ``next_token``.
        ignore_index: ignored label value.

    Returns:
        [B, T] float32 scores (0 where no head has a valid prediction of token j + 1).
    """
    if ce_model.shape != ce_reference.shape or ce_model.dim() != 3:
        raise ValueError(
            f"ce_model {tuple(ce_model.shape)} and ce_reference {tuple(ce_reference.shape)} "
            "must be equal [B, T, H]"
        )
    batch, seq, heads = ce_model.shape
    diff = (ce_model - ce_reference).float()
    total = diff.new_zeros(batch, seq)
    count = diff.new_zeros(batch, seq)
    for k in range(1, (1 if score == "next_token" else heads) + 1):
        if seq - k <= 0:
            continue
        valid = head_valid_mask(labels, attention_mask, k, ignore_index).float()
        # Prediction at position t (< T - k) is of token t + k, i.e. weight index t + k - 1.
        total += F.pad(diff[:, : seq - k, k - 1] * valid, (k - 1, 1))
        count += F.pad(valid, (k - 1, 1))
    return total / count.clamp(min=1)


def rho1_weights(
    scores: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    top_k: float,
    unselected_weight: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Top-k% selection over the trained tokens of a batch, normalised to mean 1 over them.

    The tokens with the highest excess loss get weight 1, the others ``unselected_weight`` (0: Rho-1's
    hard selection); then all weights are divided by their mean over the trained tokens, so the loss is
    the mean CE over the selected tokens (Rho-1's normalisation) rather than shrinking with ``top_k``.

    Args:
        scores: [B, T] from :func:`excess_loss_scores`.
        labels: [B, T] targets.
        attention_mask: [B, T].
        top_k: fraction selected, in (0, 1].
        unselected_weight: weight of the rest before normalisation, in [0, 1].
        ignore_index: ignored label value.

    Returns:
        [B, T] float32 weights (1 where no prediction uses them).
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k must be in (0, 1], got {top_k}")
    applied = applied_weight_mask(labels, attention_mask, ignore_index)
    weights = torch.ones_like(scores, dtype=torch.float32)
    n = int(applied.sum())
    if n == 0:
        return weights
    n_keep = max(1, math.ceil(top_k * n))
    candidate = scores.float().masked_fill(~applied, float("-inf")).flatten()
    keep = torch.zeros_like(candidate, dtype=torch.bool)
    keep[torch.topk(candidate, n_keep, sorted=False).indices] = True
    keep = keep.view_as(scores)
    chosen = torch.where(keep, 1.0, unselected_weight)
    mean = chosen[applied].mean()
    return torch.where(applied, chosen / mean, weights)


def ev_moments(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sums that give the explained variance of a union of batches (and ranks) once added up.

    Args:
        values: [B, T, 1] or [B, T].
        rewards: [B].
        mask: [B, T] tokens that count.

    Returns:
        float64 [5]: n, sum R, sum R², sum (R - V), sum (R - V)².
    """
    v = values.detach().reshape(mask.shape).double()
    r = rewards.double()[:, None].expand_as(v)
    m = mask.double()
    resid = r - v
    return torch.stack([m.sum(), (r * m).sum(), (r * r * m).sum(), (resid * m).sum(), (resid**2 * m).sum()])


def explained_variance_from_moments(moments: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` from :func:`ev_moments` (NaN when Var(R) = 0 or nothing counted).

    Args:
        moments: the five sums.

    Returns:
        The explained variance.
    """
    n, sr, srr, se, see = (float(x) for x in moments)
    if n == 0:
        return float("nan")
    var_r = srr / n - (sr / n) ** 2
    var_e = see / n - (se / n) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else float("nan")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``.

    Args:
        step: 0-based optimizer step.
        warmup_steps: warm-up length.
        total_steps: schedule length.
        min_ratio: final factor.

    Returns:
        The LR multiplier.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
