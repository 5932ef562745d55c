"""The chunk loop of the linear-fused loss: ``hidden @ W.T`` and the chunk primitive, chunk by chunk.

The logits are never materialised: the valid rows (``N_valid <= B * T * H``; invalid rows cost nothing)
are processed in chunks of ``C`` rows, and for each chunk

    logits = h_c @ W.T (+ b)        (into one reusable [C, V] buffer, dtype of W)
    chunk primitive, in place       (ce, row weight, logits <- d loss / d logits)
    dh_c   = G @ W                  (written to the rows of the hidden gradient)
    dW    += G.T @ h_c              (addmm_ into the weight gradient)
    db    += G.sum(0)

Memory beyond inputs and gradients (:func:`workspace_bytes`): one ``[C, V]`` chunk of logits in the
weight's dtype, two or three ``[C, d]`` buffers (:func:`row_buffers`), ``O(N)`` row data and an ``[V]``
float32 bias accumulator. The weight gradient accumulates in the weight's dtype (as Liger-Kernel does): for
bfloat16 it is rounded once per chunk, which the large default chunks keep to a few roundings; a float32
accumulator would cost ``4 V d`` bytes.

Chunk size: ``chunk_size`` rows, or by default ``budget // (V * itemsize)`` rows within
:data:`CHUNK_ROWS_BOUNDS`, with the budget :data:`CHUNK_BUDGET_BYTES` per device type (others: the CPU's),
then balanced so all chunks have nearly equal size. The chunk primitive is the backend's (``ChunkFn`` in
:mod:`wmtp_kernels._common`): Triton's ``weighted_ce_chunk_`` or the torch path's ``linear_chunk_``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from wmtp_kernels import _torch_path
from wmtp_kernels._common import RowWeights, triton_chunk_fn

# Bytes of the [C, V] logits chunk by default. CPU: 64 MiB is 512 float32 rows at V = 32000 (measured
# within a few % of the 3-GEMM floor, see benchmarks/RESULTS.md), under a tenth of the naive
# implementation's extra memory. CUDA: every chunk reads and rewrites the whole [V, d] weight gradient,
# which on an H100 costs about 175 / C of the chunk's three GEMMs, so chunks are as long as the memory
# targets allow: at most 448 MiB of logits (under 0.5 GiB in all at V = 128256) and 3072 rows (under
# 0.25 GiB at V = 32000). Measured in benchmarks/KERNEL_NOTES.md ("CUDA chunk length").
# CPU: with fewer rows every GEMM of the loop loses efficiency (the whole [V, d] weight and its gradient
# are streamed per chunk), so the budget never gives fewer than 192: at V = 128256 that is 83 MiB instead
# of 63, and 1.09x the floor instead of 1.20-1.26x; 256 rows gave 1.08x at 126 MiB in the same quiet runs
# (benchmarks/KERNEL_NOTES.md, "The CPU path").
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 448 * 2**20}
CHUNK_ROWS_BOUNDS = {"cpu": (192, None), "cuda": (16, 3072)}
"""Per device type, the fewest and the most rows (None: no limit) a default chunk has."""


def default_chunk_rows(vocab: int, itemsize: int, device_type: str) -> int:
    """Rows per chunk from the memory budget, ``budget // (V * itemsize)``, within the device's bounds.

    Args:
        vocab: V.
        itemsize: Bytes per logit (the dtype of the chunk).
        device_type: ``"cpu"``, ``"cuda"``, ...

    Returns:
        The number of rows.
    """
    kind = device_type if device_type in CHUNK_BUDGET_BYTES else "cpu"
    fewest, most = CHUNK_ROWS_BOUNDS[kind]
    rows = max(fewest, CHUNK_BUDGET_BYTES[kind] // (vocab * itemsize))
    return rows if most is None else min(rows, most)


def row_buffers(impl: str, need: tuple[bool, bool, bool]) -> int:
    """How many ``[C, d]`` buffers :func:`linear_pass` allocates: the gathered hidden rows, their
    gradient (if the hidden gradient is needed) and, on the torch path, the scaled rows of the weight
    gradient."""
    return 1 + need[0] + (need[1] and impl == "torch")


def workspace_bytes(n_rows: int, vocab: int, dim: int, itemsize: int, impl: str, device_type: str) -> int:
    """The chunk loop's own buffers with the default chunk and every gradient: one ``[C, V]`` chunk of
    logits and :func:`row_buffers` ``[C, d]`` buffers (row data not included)."""
    chunk = min(balanced_chunk_rows(n_rows, default_chunk_rows(vocab, itemsize, device_type)), n_rows)
    return chunk * (vocab + row_buffers(impl, (True, True, False)) * dim) * itemsize


def balanced_chunk_rows(n_rows: int, max_rows: int) -> int:
    """The chunk length that splits ``n_rows`` into ``ceil(n_rows / max_rows)`` nearly equal chunks."""
    if n_rows == 0:
        return 1
    return math.ceil(n_rows / math.ceil(n_rows / max_rows))


@dataclass
class PassResult:
    ce: torch.Tensor
    row_weight: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def _zero_except(n_all: int, dim: int, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An ``[n_all, dim]`` tensor whose rows outside ``rows`` are zero (the others are written later).

    Zero-filling all of it costs one write pass; selecting the skipped rows would synchronise."""
    new = torch.empty if rows.numel() == n_all else torch.zeros
    return new(n_all, dim, dtype=like.dtype, device=like.device)


def _raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor):
    return F.linear(h[idx], weight, bias)


def linear_pass(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    source: RowWeights,
    impl: str,
    chunk_rows: int,
    need: tuple[bool, bool, bool],
) -> PassResult:
    """One chunked pass over the given rows; gradients for the ``need``-ed of (hidden, weight, bias).

    The chunks are computed in the weight's dtype: with a float32 weight and bfloat16 / float16 hidden
    states (autocast), each chunk of hidden rows is cast up as it is gathered, the weight is never
    copied, its gradient accumulates in float32, and the hidden gradient is rounded once per row. The
    caller casts ``bias`` to the weight's dtype.
    """
    n_valid, (n_all, dim), vocab = rows.numel(), hidden2d.shape, weight.shape[0]
    device, dtype = hidden2d.device, weight.dtype
    mixed = hidden2d.dtype != dtype
    step = balanced_chunk_rows(n_valid, chunk_rows)
    width = min(step, max(n_valid, 1))
    logits_buf = torch.empty(width, vocab, dtype=dtype, device=device)
    h_buf, *more = torch.empty(row_buffers(impl, need), width, dim, dtype=dtype, device=device)
    dh_buf = more.pop(0) if need[0] else None
    # Only the torch path returns a row coefficient that scales the hidden rows for the weight gradient.
    hs_buf = more.pop(0) if more else None
    grad_hidden = _zero_except(n_all, dim, rows, hidden2d) if need[0] else None
    # The first chunk writes the weight gradient (beta = 0), saving a zero-fill pass over [V, d].
    grad_weight = (weight.new_empty if n_valid else weight.new_zeros)(weight.shape) if need[1] else None
    grad_bias = torch.zeros(vocab, dtype=scale.dtype, device=device) if need[2] else None
    ce = torch.empty(n_valid, dtype=scale.dtype, device=device)
    row_weight = torch.empty_like(ce)
    chunk_fn = None if impl == "torch" else triton_chunk_fn()
    w_t = weight.t()

    for start in range(0, n_valid, step):
        part = slice(start, min(start + step, n_valid))
        idx = rows[part]
        c = idx.numel()
        if mixed:  # noqa: SIM108 (cast the chunk's rows up to the weight's dtype as they are gathered)
            h_c = h_buf[:c].copy_(hidden2d[idx])
        else:
            h_c = torch.index_select(hidden2d, 0, idx, out=h_buf[:c])
        logits = logits_buf[:c]
        if bias is None:
            torch.mm(h_c, w_t, out=logits)
        else:
            torch.addmm(bias, h_c, w_t, out=logits)
        weights_c, td_c = source.chunk(part)
        if chunk_fn is None:
            raw = partial(_raw_logits, h_c, weight, bias)
            ce[part], row_weight[part], coef = _torch_path.linear_chunk_(
                logits, targets[part], scale[part], weights_c, td_c, raw
            )
        else:
            ce[part], row_weight[part] = chunk_fn(logits, targets[part], scale[part], weights_c, td_c)
            coef = None
        if need[1]:
            h_scaled = h_c if coef is None else torch.mul(h_c, coef[:, None], out=hs_buf[:c])
            if start == 0:
                torch.mm(logits.t(), h_scaled, out=grad_weight)
            else:
                grad_weight.addmm_(logits.t(), h_scaled)
        if need[2]:
            if coef is None:
                grad_bias.add_(logits.sum(0, dtype=grad_bias.dtype))
            else:
                grad_bias.addmv_(logits.t(), coef)
        if need[0]:
            dh_c = torch.mm(logits, weight, out=dh_buf[:c])
            if coef is not None:
                dh_c.mul_(coef[:, None])
            grad_hidden.index_copy_(0, idx, dh_c.to(grad_hidden.dtype))
    return PassResult(ce, row_weight, grad_hidden, grad_weight, grad_bias)
