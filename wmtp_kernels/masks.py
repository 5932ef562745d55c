"""Which positions and predictions count: last real token, valid predictions per head, weighted positions.

Production versions (the fast paths and the trainer use these); :mod:`wmtp_kernels.reference` keeps its
own plain implementations, and the tests compare the two. Every function here is traceable: no host
synchronisation, no data-dependent shapes, so it runs under ``torch.compile`` and fake tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_kernels._validation import batch_and_seq, check_labels, check_mask
from wmtp_kernels.options import IGNORE_INDEX


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding).

    Args:
        attention_mask: ``[B, T]``, nonzero for real tokens.

    Returns:
        ``[B]`` int64; ``-1`` for a row without real tokens.
    """
    real = attention_mask.bool()
    from_end = real.flip(1).to(torch.int8).argmax(dim=1)  # first real token counted from the end
    return torch.where(real.any(dim=1), attention_mask.shape[1] - 1 - from_end, -1)


def prediction_targets(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, heads: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which predictions of heads 1..H count, and their target ids, for all heads at once.

    Head k (1-based) at position ``t`` predicts the token at ``t + k``. The prediction counts when
    ``t + k < T``, both positions are real tokens and the target label is not ``ignore_index``.

    Args:
        labels: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` mask or ``None`` (all real).
        heads: H.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``valid`` ``[B, T, H]`` bool and ``target_ids`` ``[B, T, H]`` (the label at ``t + k``, clamped to
        the last position where ``t + k >= T``; meaningful only where ``valid``).
    """
    seq = labels.shape[1]
    t = torch.arange(seq, device=labels.device)[:, None]
    target_pos = t + torch.arange(1, heads + 1, device=labels.device)[None, :]
    in_sequence = target_pos < seq
    target_pos = target_pos.clamp(max=seq - 1)
    target_ids = labels[:, target_pos]
    valid = in_sequence & (target_ids != ignore_index)
    if attention_mask is not None:
        real = attention_mask.bool()
        valid = valid & real[:, :, None] & real[:, target_pos]
    return valid, target_ids


def head_valid_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, k: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``valid_k[b, t]``: head k (1-based) at position ``t < T - k`` has a target that counts.

    A prediction counts when both its position and its target position are real tokens and the target
    label is not ``ignore_index`` (:func:`prediction_targets` for all heads at once).

    Args:
        labels: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` mask or ``None`` (all real).
        k: Head offset, 1..H.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``[B, max(T - k, 0)]`` bool.
    """
    valid, _ = prediction_targets(labels, attention_mask, k, ignore_index)
    return valid[:, : max(labels.shape[1] - k, 0), k - 1]


def applied_weight_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Positions j whose weight is applied to a valid prediction (of token j + 1), as ``[B, T]`` bool.

    Every target token is predicted by head 1, so these are exactly head 1's valid positions; the
    statistics of weights and TD errors returned with ``return_stats=True`` are taken over them.

    Args:
        labels: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` mask or ``None``.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``[B, T]`` bool (the last column is always False).
    """
    return F.pad(head_valid_mask(labels, attention_mask, 1, ignore_index), (0, 1), value=False)


def count_mtp_targets(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    n_heads: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Number of valid predictions of each head: what ``reduction="mean"`` divides head k's sum by.

    For exact normalisation over several micro-batches (gradient accumulation) or ranks, sum these
    counts over all of them (``all_reduce`` across ranks) and pass the total as ``target_counts`` to
    every call; the accumulated gradient then equals the one of the single big batch (the
    ``num_items_in_batch`` pattern of Hugging Face, per head).

    Args:
        labels: ``[B, T]`` integer token ids.
        attention_mask: ``[B, T]`` mask or ``None`` (all real).
        n_heads: H, the number of future-token heads.
        ignore_index: Label value excluded from the loss.

    Returns:
        ``[H]`` int64 counts on the device of ``labels`` (no host synchronisation).
    """
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    batch, seq = batch_and_seq("labels", labels)
    check_labels(labels, batch, seq)
    check_mask(attention_mask, batch, seq)
    return prediction_targets(labels, attention_mask, n_heads, ignore_index)[0].sum(dim=(0, 1))
