"""Chunk primitives of the PyTorch backend (the fast CPU path; same contract as ``_triton_ce``).

Where the time goes on a CPU (docs/DESIGN.md "§ Kernel design"): besides the three GEMMs, every
elementwise pass over a chunk of logits streams ``C * V`` values through memory. So the float32 path
makes exactly one fused pass: the row softmax written in place by ATen's vectorised kernel (max, exp-sum
and normalisation of one row while it sits in cache). The cross-entropy then comes from the probability
of the target, ``ce = -log p[target]``; the one-hot subtraction touches ``C`` elements; and the per-row
factor ``weight * scale`` is *not* applied to the ``[C, V]`` chunk at all in the linear-fused path but to
the ``[C, d]`` operands of the gradient GEMMs (``dW += G.T @ (coef * h)``, ``dh = coef * (G @ W)``),
which is mathematically the same and d / V times cheaper.

``-log p[target]`` loses accuracy once ``p[target]`` nears the float32 underflow (cross-entropy above
~69 nats). Such rows are detected (``p < 1e-30``) and their cross-entropy recomputed exactly, either from
the raw logits of those rows (the linear-fused path recomputes them from the hidden states) or from the
row maxima taken before the softmax.

Low-precision chunks (bfloat16 / float16) are processed in float32 blocks of rows (a few MiB), so the
gradient is rounded to the chunk dtype exactly once, with the row factor already applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from wmtp_kernels._rows import TDRowInputs, td_row_weights
from wmtp_kernels._validation import LOW_PRECISION

# p[target] below this is too close to the float32 underflow for -log(p) to be accurate (~69 nats).
_TINY_PROB = 1e-30
# float32 working set of the low-precision path: rows are converted in blocks of about this many bytes.
_LOW_PRECISION_BLOCK_BYTES = 8 * 2**20

RawRows = Callable[[torch.Tensor], torch.Tensor]


def _subtract_onehot_(logits: torch.Tensor, targets: torch.Tensor, amount: torch.Tensor | float) -> None:
    rows = torch.arange(logits.shape[0], device=logits.device)
    value = amount if isinstance(amount, torch.Tensor) else torch.tensor(amount, device=logits.device)
    logits.index_put_((rows, targets), -value.to(logits.dtype), accumulate=True)


def _full_precision_softmax_ce_(
    logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor | None, raw_rows: RawRows | None
) -> torch.Tensor:
    row_max = None if raw_rows is not None else logits.amax(dim=1)
    raw_target = logits.gather(1, targets[:, None]).squeeze(1) if raw_rows is None else None
    if logits.is_contiguous():
        torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    else:  # ATen's out= softmax is only alias-safe on contiguous rows
        logits.copy_(torch.softmax(logits, dim=1))
    p_target = logits.gather(1, targets[:, None]).squeeze(1)
    ce = -torch.log(p_target)
    tiny = (p_target < _TINY_PROB).nonzero().squeeze(1)
    if tiny.numel():
        if raw_rows is not None:
            raw = raw_rows(tiny)
            ce[tiny] = torch.logsumexp(raw, dim=1) - raw.gather(1, targets[tiny, None]).squeeze(1)
        else:
            # lse = max(x) - log(max(p)); max(p) >= 1 / V never underflows.
            lse = row_max[tiny] - torch.log(logits[tiny].amax(dim=1))
            ce[tiny] = lse - raw_target[tiny]
    if coef is None:
        _subtract_onehot_(logits, targets, 1.0)
    else:
        logits.mul_(coef[:, None])
        _subtract_onehot_(logits, targets, coef)
    return ce


def _low_precision_softmax_ce_(
    logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor | None
) -> torch.Tensor:
    rows, vocab = logits.shape
    block = max(1, _LOW_PRECISION_BLOCK_BYTES // (4 * vocab))
    ce = torch.empty(rows, dtype=torch.float32, device=logits.device)
    for start in range(0, rows, block):
        end = min(start + block, rows)
        x = logits[start:end].float()
        tgt = targets[start:end]
        lse = torch.logsumexp(x, dim=1)
        ce[start:end] = lse - x.gather(1, tgt[:, None]).squeeze(1)
        probs = x.sub_(lse[:, None]).exp_()
        if coef is None:
            _subtract_onehot_(probs, tgt, 1.0)
        else:
            probs.mul_(coef[start:end, None])
            _subtract_onehot_(probs, tgt, coef[start:end])
        logits[start:end].copy_(probs)
    return ce


def softmax_ce_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    coef: torch.Tensor | None = None,
    raw_rows: RawRows | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``C`` rows; ``logits`` is overwritten with ``(softmax - onehot) * coef``.

    Args:
        logits: ``[C, V]`` float32 / bfloat16 / float16, contiguous along V.
        targets: ``[C]`` int64 ids in ``[0, V)``.
        coef: ``[C]`` float32 row factors, or ``None`` for 1 (the caller applies them later).
        raw_rows: Optional callable giving the original float logits of some rows (``[n]`` int64 ->
            ``[n, V]``), used to recompute the cross-entropy of rows whose target probability nears the
            float32 underflow; without it the row maxima are taken before the softmax (one extra read).

    Returns:
        ``[C]`` float32 unweighted cross-entropy ``logsumexp(row) - row[target]``.
    """
    if logits.dtype in LOW_PRECISION:
        return _low_precision_softmax_ce_(logits, targets, coef)
    return _full_precision_softmax_ce_(logits, targets, coef, raw_rows)


def _row_weights(weights: torch.Tensor | None, td: TDRowInputs | None) -> torch.Tensor:
    if (weights is None) == (td is None):
        raise ValueError("give exactly one of weights and td (got both or neither)")
    return weights if td is None else td_row_weights(td)


def weighted_ce_chunk_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor | None,
    td: TDRowInputs | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy of ``C`` logit rows; ``logits`` is overwritten with its gradient.

    The PyTorch twin of :func:`wmtp_kernels._triton_ce.weighted_ce_chunk_` (same contract): after the
    call ``logits[i] = (softmax(logits[i]) - onehot(targets[i])) * w[i] * scale[i]`` in the logits
    dtype, all zeros where ``scale[i] == 0`` (even if that row held NaN / Inf).

    Args:
        logits: ``[C, V]`` float32 / bfloat16 / float16, contiguous along V.
        targets: ``[C]`` int64 target ids (any legal id where ``scale == 0``).
        scale: ``[C]`` float32 per-row loss scale (0 for rows that do not count).
        weights: ``[C]`` float32 per-row weights, or ``None`` when ``td`` is given.
        td: Inputs for per-row TD weights, or ``None`` when ``weights`` is given.

    Returns:
        ``(ce, row_weight)``: ``[C]`` float32 unweighted cross-entropy (0 where ``scale == 0``) and
        ``[C]`` float32 weight of each row.
    """
    row_weight = _row_weights(weights, td)
    dead = (scale == 0).nonzero().squeeze(1)
    if dead.numel():
        logits.index_fill_(0, dead, 0.0)  # keeps NaN / Inf of rows that do not count out of the softmax
    ce = softmax_ce_(logits, targets, coef=row_weight * scale)
    ce[dead] = 0.0
    return ce, row_weight


def linear_chunk_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    weights: torch.Tensor | None,
    td: TDRowInputs | None,
    raw_rows: RawRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chunk step of the linear-fused loss: like :func:`weighted_ce_chunk_`, row factor deferred.

    For float32 / float64 chunks the gradient left in ``logits`` is ``softmax - onehot`` and the
    returned ``coef = weight * scale`` (logits dtype) must be applied by the caller, to the ``[C, d]``
    GEMM operands; for low-precision chunks it is applied here (one rounding) and ``None`` is
    returned. All rows must be valid (the linear-fused path compacts them).

    Args:
        logits: ``[C, V]`` contiguous chunk of logits.
        targets: ``[C]`` int64 ids in ``[0, V)``.
        scale: ``[C]`` float32 per-row loss scale.
        weights: ``[C]`` float32 per-row weights, or ``None`` when ``td`` is given.
        td: Inputs for per-row TD weights, or ``None``.
        raw_rows: Recomputes the original logits of some rows (see :func:`softmax_ce_`).

    Returns:
        ``(ce, row_weight, coef_or_None)``.
    """
    row_weight = _row_weights(weights, td)
    coef = row_weight * scale
    if logits.dtype in LOW_PRECISION:
        return softmax_ce_(logits, targets, coef), row_weight, None
    return softmax_ce_(logits, targets, None, raw_rows), row_weight, coef.to(logits.dtype)
