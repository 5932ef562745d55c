"""The linear-fused loss's row plan in two Triton kernels: the Triton path's prologue on CUDA.

Built from ``[B, T]`` labels (and mask, token weights) in two launches instead of about seventy small
PyTorch operations, each of which the host launches more slowly than the GPU runs it (measured on an
H100: 1.7 ms of idle device before the first GEMM at V = 32000, benchmarks/KERNEL_NOTES.md):

1. ``_count_rows_kernel`` (one program per block of rows): which rows are valid (the rule of
   :func:`wmtp_kernels.masks.prediction_targets`), the number of valid rows of each block, and the
   call's counts: valid rows, out-of-range labels, non-finite rewards, valid rows per head;
2. ``_compact_rows_kernel``: each block's offset is the sum of the blocks before it, so the valid rows are
   written in ascending order (deterministic, as ``nonzero`` gives them): their index, target id, loss
   scale (``1 / (H * max(count_k, 1))`` for ``mean``, 1 for ``sum``) and token weight, or their batch and
   weight indices for the in-kernel TD weights.

The host reads the counts once (the call's one synchronisation) and takes the first ``N_valid`` entries
of the ``N``-sized outputs. :mod:`wmtp_kernels._rows` is the same plan in PyTorch (the other backend, and
the test's reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 1024
# Counts slots before the per-head counts: valid rows, out-of-range labels, non-finite rewards.
N_TOTALS = 3
_HEAD_COUNTS_AT = tl.constexpr(N_TOTALS)  # the same, readable inside the kernels


@triton.jit
def _row_validity(
    labels_ptr, mask_ptr, rows, n_rows, seq, ignore_index, HEADS: tl.constexpr, HAS_MASK: tl.constexpr
):
    pos = rows // HEADS
    k = rows % HEADS + 1
    t = pos % seq
    base = pos - t  # b * T
    target_t = tl.minimum(t + k, seq - 1)
    in_range = rows < n_rows
    label = tl.load(labels_ptr + base + target_t, mask=in_range, other=ignore_index)
    valid = in_range & (t + k < seq) & (label != ignore_index)
    if HAS_MASK:
        real_here = tl.load(mask_ptr + pos, mask=in_range, other=0) != 0
        real_there = tl.load(mask_ptr + base + target_t, mask=in_range, other=0) != 0
        valid = valid & real_here & real_there
    return valid, label, k, t, base


@triton.jit
def _count_rows_kernel(
    labels_ptr,
    mask_ptr,
    rewards_ptr,
    block_counts_ptr,
    counts_ptr,
    n_rows,
    seq,
    batch,
    vocab,
    ignore_index,
    HEADS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_REWARDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, _, k, _, _ = _row_validity(labels_ptr, mask_ptr, rows, n_rows, seq, ignore_index, HEADS, HAS_MASK)
    n_valid = tl.sum(valid.to(tl.int64), axis=0)
    tl.store(block_counts_ptr + pid, n_valid)
    tl.atomic_add(counts_ptr, n_valid)
    for head in tl.static_range(HEADS):
        in_head = (valid & (k == head + 1)).to(tl.int64)
        tl.atomic_add(counts_ptr + _HEAD_COUNTS_AT + head, tl.sum(in_head, axis=0))
    # Every position is the first head's row once: check each label there.
    first_head = (rows < n_rows) & (k == 1)
    own = tl.load(labels_ptr + rows // HEADS, mask=first_head, other=0)
    bad = first_head & (own != ignore_index) & ((own < 0) | (own >= vocab))
    tl.atomic_add(counts_ptr + 1, tl.sum(bad.to(tl.int64), axis=0))
    if HAS_REWARDS:  # noqa: SIM102 (a constexpr condition, then a runtime one)
        if pid == 0:
            n_bad = tl.zeros((), dtype=tl.int64)
            for start in range(0, batch, BLOCK):
                b = start + tl.arange(0, BLOCK)
                r = tl.load(rewards_ptr + b, mask=b < batch, other=0.0).to(tl.float32)
                n_bad += tl.sum(((r != r) | (tl.abs(r) == float("inf"))).to(tl.int64), axis=0)
            tl.atomic_add(counts_ptr + 2, n_bad)


@triton.jit
def _compact_rows_kernel(
    labels_ptr,
    mask_ptr,
    weights_ptr,
    target_counts_ptr,
    block_counts_ptr,
    counts_ptr,
    rows_out_ptr,
    targets_out_ptr,
    scale_out_ptr,
    weights_out_ptr,
    row_b_out_ptr,
    row_j_out_ptr,
    n_rows,
    seq,
    ignore_index,
    HEADS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WEIGHT_SOURCE: tl.constexpr,  # 0: uniform, 1: token weights, 2: TD (batch and weight indices)
    MEAN: tl.constexpr,
    HAS_TARGET_COUNTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offset = tl.zeros((), dtype=tl.int64)
    for start in range(0, pid, BLOCK):
        before = start + tl.arange(0, BLOCK)
        offset += tl.sum(tl.load(block_counts_ptr + before, mask=before < pid, other=0), axis=0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid, label, k, t, base = _row_validity(
        labels_ptr, mask_ptr, rows, n_rows, seq, ignore_index, HEADS, HAS_MASK
    )
    flags = valid.to(tl.int64)
    dest = offset + tl.cumsum(flags, axis=0) - flags
    tl.store(rows_out_ptr + dest, rows, mask=valid)
    tl.store(targets_out_ptr + dest, label.to(tl.int64), mask=valid)
    scale = tl.full((BLOCK,), 1.0, dtype=tl.float32)
    if MEAN:
        if HAS_TARGET_COUNTS:
            count = tl.load(target_counts_ptr + k - 1, mask=valid, other=1)
        else:
            count = tl.load(counts_ptr + _HEAD_COUNTS_AT + k - 1, mask=valid, other=1)
        scale = 1.0 / (HEADS * tl.maximum(count, 1).to(tl.float32))
    tl.store(scale_out_ptr + dest, scale, mask=valid)
    j = tl.minimum(t + k - 1, seq - 1)
    if WEIGHT_SOURCE == 1:
        weight = tl.load(weights_ptr + base + j, mask=valid, other=0.0).to(tl.float32)
        tl.store(weights_out_ptr + dest, weight, mask=valid)
    if WEIGHT_SOURCE == 2:
        tl.store(row_b_out_ptr + dest, base // seq, mask=valid)
        tl.store(row_j_out_ptr + dest, j, mask=valid)


@dataclass(frozen=True)
class RowPlanBuffers:
    """What the two kernels wrote; entries past ``N_valid`` (read from ``counts``) are undefined.

    Attributes:
        counts: ``[3 + H]`` int64: valid rows, out-of-range labels, non-finite rewards, valid rows per head.
        rows: ``[N]`` int64 indices of the valid rows, ascending.
        targets: ``[N]`` int64 target ids of those rows.
        scale: ``[N]`` float32 loss scales.
        weights: ``[N]`` float32 token weights of those rows (token-weight source), else ``None``.
        row_b: ``[N]`` int64 batch index of those rows (TD source), else ``None``.
        row_j: ``[N]`` int64 weight index of those rows (TD source), else ``None``.
    """

    counts: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor
    weights: torch.Tensor | None
    row_b: torch.Tensor | None
    row_j: torch.Tensor | None


def plan_rows(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    heads: int,
    vocab: int,
    ignore_index: int,
    weight_source: str,
    weights: torch.Tensor | None,
    rewards: torch.Tensor | None,
    target_counts: torch.Tensor | None,
    mean: bool,
    block_rows: int = BLOCK_ROWS,
) -> RowPlanBuffers:
    """Launch the two kernels (no synchronisation).

    Args:
        labels: ``[B, T]`` integer token ids.
        attention_mask: ``[B, T]`` mask (nonzero = real token) or ``None``.
        heads: H.
        vocab: V (labels outside ``[0, V)`` other than ``ignore_index`` are counted).
        ignore_index: Label value excluded from the loss.
        weight_source: ``"uniform"``, ``"weights"`` (gather ``weights``) or ``"td"`` (batch / weight indices).
        weights: ``[B, T]`` token weights for the ``"weights"`` source.
        rewards: ``[B]`` rewards whose non-finite entries are counted, or ``None``.
        target_counts: ``[H]`` counts that ``mean`` divides by, or ``None`` for this batch's.
        mean: ``reduction="mean"`` scales, else 1.
        block_rows: Rows per program (a power of two).

    Returns:
        The :class:`RowPlanBuffers`.
    """
    batch, seq = labels.shape
    n_rows, device = batch * seq * heads, labels.device
    n_blocks = max(triton.cdiv(n_rows, block_rows), 1)
    labels = labels.contiguous()
    mask = labels if attention_mask is None else attention_mask.contiguous()
    block_counts = torch.empty(n_blocks, dtype=torch.int64, device=device)
    counts = torch.zeros(N_TOTALS + heads, dtype=torch.int64, device=device)
    floats = rewards is not None and rewards.is_floating_point()
    _count_rows_kernel[(n_blocks,)](
        labels, mask, rewards.detach() if floats else counts, block_counts, counts,
        n_rows, seq, batch, vocab, ignore_index,
        HEADS=heads, HAS_MASK=attention_mask is not None, HAS_REWARDS=floats, BLOCK=block_rows,
    )  # fmt: skip
    rows = torch.empty(n_rows, dtype=torch.int64, device=device)
    targets = torch.empty_like(rows)
    scale = torch.empty(n_rows, dtype=torch.float32, device=device)
    source = {"uniform": 0, "weights": 1, "td": 2}[weight_source]
    row_weights = torch.empty_like(scale) if source == 1 else None
    row_b, row_j = (torch.empty_like(rows), torch.empty_like(rows)) if source == 2 else (None, None)
    token_weights = weights.detach().contiguous() if source == 1 else scale
    _compact_rows_kernel[(n_blocks,)](
        labels, mask, token_weights, counts if target_counts is None else target_counts.contiguous(),
        block_counts, counts, rows, targets, scale,
        scale if row_weights is None else row_weights, rows if row_b is None else row_b,
        rows if row_j is None else row_j, n_rows, seq, ignore_index,
        HEADS=heads, HAS_MASK=attention_mask is not None, WEIGHT_SOURCE=source, MEAN=mean,
        HAS_TARGET_COUNTS=target_counts is not None, BLOCK=block_rows,
    )  # fmt: skip
    return RowPlanBuffers(counts, rows, targets, scale, row_weights, row_b, row_j)
