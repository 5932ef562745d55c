"""Per-row inputs shared by the chunk primitives of every backend (kernel contract)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TDRowInputs:
    """What a chunk kernel needs to compute each row's TD weight in-kernel.

    Row ``i`` of a chunk takes its weight from sequence ``row_b[i]`` at weight index ``row_j[i]``
    (``j = t + k - 1`` for head k at position t), with the TD error of
    :func:`wmtp_kernels.reference.compute_td_errors` and the weight of
    :func:`wmtp_kernels.reference.build_weights`.

    Attributes:
        values: ``[B, T]`` float32 contiguous critic values (detached).
        rewards: ``[B]`` float32 sequence rewards.
        mask: ``[B, T]`` bool / int8 contiguous attention mask (nonzero = real token).
        last: ``[B]`` int64 index of the last real token of each sequence (``-1`` if none).
        row_b: ``[C]`` int64 batch index of each row.
        row_j: ``[C]`` int64 weight index of each row.
        gamma: TD discount.
        beta: Weight temperature (> 0).
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: ``"last_state"`` or ``"last_transition"``.
    """

    values: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    row_b: torch.Tensor
    row_j: torch.Tensor
    gamma: float
    beta: float
    min_weight: float
    max_weight: float
    terminal: str
