"""The learning-rate schedule of both stages: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


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


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that multiplies every group's LR by :func:`lr_factor` of the optimizer step.

    Args:
        optimizer: the optimizer.
        warmup_steps: warm-up length.
        total_steps: schedule length.
        min_ratio: final factor.

    Returns:
        The scheduler (checkpointable through its ``state_dict``).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio)
    )
