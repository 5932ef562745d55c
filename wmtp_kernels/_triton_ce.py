"""Triton chunk primitive: weighted cross-entropy of a chunk of logit rows, gradient written in place.

One program per row. Pass 1 runs an online log-sum-exp over the row in ``BLOCK_V`` tiles (float32
whatever the logits dtype); pass 2 reads the row again and overwrites it with
``(softmax - onehot(target)) * weight * scale`` in the logits dtype. Rows with ``scale == 0`` skip both
passes and are written as zeros. The row weight is either read from ``weights`` or, with ``HAS_TD``,
computed in-kernel from critic values: the TD error of :func:`wmtp_kernels.reference.compute_td_errors`
followed by the clipped exponential of :func:`wmtp_kernels.reference.build_weights`.

Memory traffic per chunk: two reads and one write of the logits (see ``benchmarks/KERNEL_NOTES.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wmtp_kernels._rows import TDRowInputs
from wmtp_kernels.options import WeightingOptions

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_V = 4096


@triton.jit
def _td_error(
    values_ptr, rewards_ptr, mask_ptr, last_ptr, b, j, seq_len, gamma, LAST_TRANSITION: tl.constexpr
):
    """TD error at (b, j), exactly as ``reference.compute_td_errors``; out-of-range (b, j) give 0."""
    in_range = (b >= 0) & (j >= 0) & (j < seq_len)
    base = b.to(tl.int64) * seq_len
    last = tl.load(last_ptr + b, mask=b >= 0, other=-1)
    real_j = tl.load(mask_ptr + base + j, mask=in_range, other=0) != 0
    v_j = tl.load(values_ptr + base + j, mask=in_range, other=0.0)
    has_next = in_range & (j + 1 < seq_len)
    real_next = tl.load(mask_ptr + base + j + 1, mask=has_next, other=0) != 0
    v_next = tl.load(values_ptr + base + j + 1, mask=has_next, other=0.0)
    outcome = tl.load(rewards_ptr + b, mask=b >= 0, other=0.0) - v_j
    td = tl.where((j < last) & real_next, gamma * v_next - v_j, 0.0)
    # last_transition: td[last] = 0 already (no bootstrap at j == last), and the reference's
    # `last >= 1` is implied, as j == last - 1 < 0 is out of range and masked below.
    terminal_j = last - 1 if LAST_TRANSITION else last
    td = tl.where(j == terminal_j, outcome, td)
    return tl.where(real_j, td, 0.0)


@triton.jit
def _clipped_exp_weight(td, beta, min_weight, max_weight):
    """``clamp(exp(td / beta), min_weight, max_weight)`` as ``reference.build_weights``."""
    return tl.minimum(tl.maximum(tl.exp(td / beta), min_weight), max_weight)


@triton.jit
def _weighted_ce_rows_kernel(
    logits_ptr,
    targets_ptr,
    scale_ptr,
    weights_ptr,
    values_ptr,
    rewards_ptr,
    mask_ptr,
    last_ptr,
    row_b_ptr,
    row_j_ptr,
    ce_ptr,
    row_weight_ptr,
    vocab,
    row_stride,
    n_batch,
    seq_len,
    gamma,
    beta,
    min_weight,
    max_weight,
    HAS_TD: tl.constexpr,
    LAST_TRANSITION: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    scale = tl.load(scale_ptr + row)

    if HAS_TD:
        b = tl.load(row_b_ptr + row)
        b = tl.where(b < n_batch, b, -1)
        td = _td_error(
            values_ptr,
            rewards_ptr,
            mask_ptr,
            last_ptr,
            b,
            tl.load(row_j_ptr + row),
            seq_len,
            gamma,
            LAST_TRANSITION,
        )
        weight = _clipped_exp_weight(td, beta, min_weight, max_weight)
    else:
        weight = tl.load(weights_ptr + row)

    if scale == 0.0:
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            tl.store(
                row_ptr + offs, tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty), mask=offs < vocab
            )
        ce = 0.0
    else:
        target = tl.load(targets_ptr + row)
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # An all -inf prefix keeps the max at -inf; shift by 0 then so no -inf - -inf = NaN appears.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        lse = tl.where(running_max == -float("inf"), 0.0, running_max) + tl.log(running_sum)
        target_logit = tl.load(row_ptr + target, mask=(target >= 0) & (target < vocab), other=0.0)
        ce = lse - target_logit.to(tl.float32)

        coef = weight * scale
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=-float("inf")).to(tl.float32)
            onehot = tl.where(offs == target, 1.0, 0.0)
            grad = (tl.exp(x - lse) - onehot) * coef
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=in_row)

    tl.store(ce_ptr + row, ce)
    tl.store(row_weight_ptr + row, weight)


def launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a row of ``vocab`` logits.

    Tiles are at most ``MAX_BLOCK_V`` wide (16 fp32 values per thread at 8 warps, no spills); small
    vocabularies get one tile and fewer warps so that no lane idles on masked loads.

    Args:
        vocab: Row length V (>= 1).

    Returns:
        The tile width (a power of two) and the number of warps.
    """
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 512 else 1 if block_v <= 64 else 2
    return block_v, num_warps


def _check_vector(name: str, t: torch.Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape [C] = [{rows}], got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [C, V] with V >= 1, got {list(logits.shape)}")
    rows, vocab = logits.shape
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along V (stride(1) == 1), got strides {logits.stride()}")
    if rows > 1 and logits.stride(0) < vocab:
        raise ValueError(f"logits rows must not overlap: stride(0) = {logits.stride(0)} < V = {vocab}")
    if logits.device.type != "cuda" and isinstance(_weighted_ce_rows_kernel, triton.runtime.JITFunction):
        raise ValueError(
            f"the Triton path needs CUDA tensors (logits are on {logits.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run it on CPU"
        )


def _check_td(td: TDRowInputs, rows: int, device: torch.device) -> torch.Tensor:
    """Validate the TD inputs; return the mask as uint8 (a view, no copy)."""
    WeightingOptions(td.gamma, td.beta, td.min_weight, td.max_weight, td.terminal)
    if not isinstance(td.values, torch.Tensor) or td.values.dim() != 2:
        raise ValueError(f"td.values must be a [B, T] tensor, got {getattr(td.values, 'shape', td.values)}")
    batch, seq = td.values.shape
    for name, t in (("td.values", td.values), ("td.mask", td.mask)):
        if not isinstance(t, torch.Tensor) or t.shape != (batch, seq):
            raise ValueError(f"{name} must have shape [B, T] = [{batch}, {seq}], got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but logits are on {device}")
    if td.values.dtype != torch.float32:
        raise TypeError(f"td.values must be float32, got {td.values.dtype}")
    if td.mask.dtype not in (torch.bool, torch.int8, torch.uint8):
        raise TypeError(f"td.mask must be bool, int8 or uint8, got {td.mask.dtype}")
    _check_vector("td.rewards", td.rewards, batch, torch.float32, device)
    _check_vector("td.last", td.last, batch, torch.int64, device)
    _check_vector("td.row_b", td.row_b, rows, torch.int64, device)
    _check_vector("td.row_j", td.row_j, rows, torch.int64, device)
    return td.mask.view(torch.uint8)


def weighted_ce_chunk_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor | None,
    td: TDRowInputs | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy of ``C`` logit rows; ``logits`` is overwritten with its gradient.

    After the call ``logits[i] = (softmax(logits[i]) - onehot(targets[i])) * w[i] * scale[i]`` in the
    logits dtype (all zeros where ``scale[i] == 0``), computed in float32. Preconditions not checked
    on the device (to avoid a synchronisation): targets lie in ``[0, V)`` where ``scale != 0``, and
    ``td.row_b`` / ``td.row_j`` index real ``[B, T]`` positions (out-of-range indices read nothing
    and give a zero TD error, never an illegal access).

    Args:
        logits: ``[C, V]`` float32 / bfloat16 / float16, contiguous along V; may be a view whose row
            stride exceeds V.
        targets: ``[C]`` int64 target ids (any value where ``scale == 0``).
        scale: ``[C]`` float32 per-row loss scale (0 for rows that do not count).
        weights: ``[C]`` float32 per-row weights, or ``None`` when ``td`` is given.
        td: Inputs for in-kernel TD weights, or ``None`` when ``weights`` is given.

    Returns:
        ``(ce, row_weight)``: ``[C]`` float32 unweighted cross-entropy ``lse - logit[target]`` (0 where
        ``scale == 0``) and ``[C]`` float32 weight used for each row.
    """
    _check_logits(logits)
    rows, vocab = logits.shape
    device = logits.device
    _check_vector("targets", targets, rows, torch.int64, device)
    _check_vector("scale", scale, rows, torch.float32, device)
    if (weights is None) == (td is None):
        raise ValueError("give exactly one of weights and td (got both or neither)")
    ce = torch.empty(rows, dtype=torch.float32, device=device)
    row_weight = torch.empty(rows, dtype=torch.float32, device=device)
    if td is None:
        _check_vector("weights", weights, rows, torch.float32, device)
        td_tensors = (scale,) * 6
        batch, seq, gamma, beta, min_weight, max_weight, last_transition = 0, 0, 1.0, 1.0, 0.0, 0.0, False
    else:
        mask = _check_td(td, rows, device)
        td_tensors = (
            td.values,
            td.rewards.contiguous(),
            mask,
            td.last.contiguous(),
            td.row_b.contiguous(),
            td.row_j.contiguous(),
        )
        batch, seq = td.values.shape
        gamma, beta, min_weight, max_weight = td.gamma, td.beta, td.min_weight, td.max_weight
        last_transition = td.terminal == "last_transition"
    if rows == 0:
        return ce, row_weight
    block_v, num_warps = launch_config(vocab)
    _weighted_ce_rows_kernel[(rows,)](
        logits,
        targets.contiguous(),
        scale.contiguous(),
        (scale if weights is None else weights).contiguous(),
        *td_tensors,
        ce,
        row_weight,
        vocab,
        logits.stride(0),
        batch,
        seq,
        float(gamma),
        float(beta),
        float(min_weight),
        float(max_weight),
        HAS_TD=td is not None,
        LAST_TRANSITION=last_transition,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return ce, row_weight


_TRITON_DTYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def aot_signature(logits_dtype: torch.dtype, has_td: bool, wide_strides: bool = False) -> dict[str, str]:
    """Argument types of ``_weighted_ce_rows_kernel`` as the host launches it, for ahead-of-time compiles.

    Args:
        logits_dtype: Dtype of the logits chunk.
        has_td: Whether the TD inputs are real tensors (otherwise the host passes ``scale`` in their place).
        wide_strides: Type the row stride as int64, as Triton does for strides of 2**31 and more.

    Returns:
        ``{argument name: Triton type}`` including ``"constexpr"`` for the constexpr arguments.
    """
    td_types = ["*fp32", "*fp32", "*u8", "*i64", "*i64", "*i64"] if has_td else ["*fp32"] * 6
    types = [_TRITON_DTYPES[logits_dtype], "*i64", "*fp32", "*fp32", *td_types, "*fp32", "*fp32"]
    types += ["i32", "i64" if wide_strides else "i32", "i32", "i32", "fp32", "fp32", "fp32", "fp32"]
    types += ["constexpr"] * 3
    return dict(zip(_weighted_ce_rows_kernel.arg_names, types, strict=True))
