"""Linear-fused weighted MTP loss: ``hidden @ W.T`` and the H-offset weighted cross-entropy, chunked.

The logits are never materialised: the valid rows (``N_valid <= B * T * H``; invalid rows cost nothing)
are processed in chunks of ``C`` rows, and for each chunk

    logits = h_c @ W.T (+ b)        (into one reusable [C, V] buffer, input dtype)
    chunk primitive, in place       (ce, row weight, logits <- d loss / d logits)
    dh_c   = G @ W                  (written to the rows of the hidden gradient)
    dW    += G.T @ h_c              (addmm_ into the weight gradient)
    db    += G.sum(0)

so the loss and every gradient exist when the forward pass returns; backward only scales them by the
incoming gradient and hands them over (nothing is kept on ``ctx``, so autograd does not copy them).
``reduction="none"`` is the exception: its gradient depends on the per-position incoming gradient, so
the forward pass computes only the losses and backward runs the chunk loop again (4 GEMMs in all).

Memory beyond inputs and gradients: one ``[C, V]`` chunk of logits in the input dtype, three ``[C, d]``
buffers, ``O(N)`` row data and an ``[V]`` float32 bias accumulator. The weight gradient accumulates
in the weight's dtype (as Liger-Kernel does): for bfloat16 it is rounded once per chunk, which the
large default chunks keep to a few roundings; a float32 accumulator would cost ``4 V d`` bytes.

Chunk size: ``chunk_size`` rows, or by default ``budget // (V * itemsize)`` rows (at least 16), with
the budget :data:`CHUNK_BUDGET_BYTES` per device type, then balanced so all chunks have nearly equal
size. The loss is returned in the dtype of ``hidden``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_kernels import _torch_path, _validation
from wmtp_kernels._common import (
    LossOptions,
    RowWeights,
    StoredGrads,
    check_chunk_size,
    check_same_device,
    head_ce_sums,
    resolve_impl,
    row_weights,
    token_weight_grads,
    triton_chunk_fn,
)
from wmtp_kernels._rows import build_row_layout, compute_dtype, row_scale
from wmtp_kernels._validation import check_hidden_inputs
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions
from wmtp_kernels.stats import loss_stats

# Bytes of the [C, V] logits chunk by default. CPU: 64 MiB is 512 float32 rows at V = 32000 (measured
# within a few % of the 3-GEMM floor, see benchmarks/RESULTS.md), under a tenth of the naive
# implementation's extra memory. CUDA: 128 MiB keeps the total well under 0.25 GiB.
CHUNK_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 128 * 2**20}
MIN_CHUNK_ROWS = 16


def default_chunk_rows(vocab: int, itemsize: int, device_type: str) -> int:
    """Rows per chunk from the memory budget: ``max(16, budget // (V * itemsize))``.

    Args:
        vocab: V.
        itemsize: Bytes per logit (the input dtype's).
        device_type: ``"cpu"``, ``"cuda"``, ...

    Returns:
        The number of rows.
    """
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"])
    return max(MIN_CHUNK_ROWS, budget // (vocab * itemsize))


def balanced_chunk_rows(n_rows: int, max_rows: int) -> int:
    """The chunk length that splits ``n_rows`` into ``ceil(n_rows / max_rows)`` nearly equal chunks."""
    if n_rows == 0:
        return 1
    return math.ceil(n_rows / math.ceil(n_rows / max_rows))


@dataclass
class _PassResult:
    ce: torch.Tensor
    row_weight: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def _zero_except(n_all: int, dim: int, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An ``[n_all, dim]`` tensor whose rows outside ``rows`` are zero (the others are written later)."""
    out = torch.empty(n_all, dim, dtype=like.dtype, device=like.device)
    if rows.numel() < n_all:
        skipped = torch.ones(n_all, dtype=torch.bool, device=like.device)
        skipped[rows] = False
        out[skipped] = 0
    return out


def _raw_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor):
    return F.linear(h[idx], weight, bias)


def _linear_pass(
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
) -> _PassResult:
    """One chunked pass over the given rows; gradients for the ``need``-ed of (hidden, weight, bias)."""
    n_valid, (n_all, dim), vocab = rows.numel(), hidden2d.shape, weight.shape[0]
    device, dtype = hidden2d.device, hidden2d.dtype
    step = balanced_chunk_rows(n_valid, chunk_rows)
    width = min(step, max(n_valid, 1))
    logits_buf = torch.empty(width, vocab, dtype=dtype, device=device)
    h_buf = torch.empty(width, dim, dtype=dtype, device=device)
    dh_buf = torch.empty(width, dim, dtype=dtype, device=device) if need[0] else None
    hs_buf = torch.empty(width, dim, dtype=dtype, device=device) if need[1] else None
    grad_hidden = _zero_except(n_all, dim, rows, hidden2d) if need[0] else None
    # The first chunk writes the weight gradient (beta = 0), saving a zero-fill pass over [V, d].
    grad_weight = (torch.empty_like if n_valid else torch.zeros_like)(weight) if need[1] else None
    grad_bias = torch.zeros(vocab, dtype=scale.dtype, device=device) if need[2] else None
    ce = torch.empty(n_valid, dtype=scale.dtype, device=device)
    row_weight = torch.empty_like(ce)
    chunk_fn = None if impl == "torch" else triton_chunk_fn()
    w_t = weight.t()

    for start in range(0, n_valid, step):
        part = slice(start, min(start + step, n_valid))
        idx = rows[part]
        c = idx.numel()
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
            grad_hidden.index_copy_(0, idx, dh_c)
    return _PassResult(ce, row_weight, grad_hidden, grad_weight, grad_bias)


class _FusedWeightedMTPLoss(torch.autograd.Function):
    """Inputs: hidden, weight, bias, weights, values, rewards (differentiable), labels, mask, options."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, weights, values, rewards, labels, attention_mask, options):
        batch, seq, heads, dim = hidden.shape
        layout = build_row_layout(labels, attention_mask, heads, options.ignore_index)
        rows = layout.valid_rows()
        targets = layout.targets[rows]
        none = options.reduction == "none"
        dtype = compute_dtype(hidden.dtype)
        scale = row_scale(layout, options.reduction, dtype)[rows]
        source = row_weights(layout, rows, weights, values, rewards, attention_mask, options.weighting, dtype)
        hidden2d = hidden.reshape(batch * seq * heads, dim)
        chunk_rows = options.chunk_rows or default_chunk_rows(
            weight.shape[0], hidden.element_size(), hidden.device.type
        )
        bias_c = None if bias is None else bias.to(hidden.dtype)
        need = (False,) * 3 if none else options.grad_flags[:3]
        result = _linear_pass(
            hidden2d, weight, bias_c, rows, targets, scale, source, options.impl, chunk_rows, need
        )
        weighted = result.ce * result.row_weight
        ce_sums = head_ce_sums(layout, rows, result.ce)
        ctx.mark_non_differentiable(ce_sums)
        token_args = (weights, values, rewards, attention_mask, options.weighting)
        if none:
            loss = torch.zeros(layout.n_rows, dtype=dtype, device=hidden.device)
            loss.index_copy_(0, rows, weighted)
            ctx.save_for_backward(hidden, weight, bias_c)
            ctx.replay = (layout, rows, targets, result, token_args, options, chunk_rows)
            return loss.view(batch, seq, heads).to(hidden.dtype), ce_sums
        token_grads = token_weight_grads(
            layout, rows, scale * result.ce, *token_args, needs=options.grad_flags[3:6]
        )
        grad_bias = None if result.grad_bias is None else result.grad_bias.to(bias.dtype)
        grad_hidden = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
        ctx.grads = StoredGrads([grad_hidden, result.grad_weight, grad_bias], list(token_grads))
        del result, grad_hidden, grad_bias
        return (scale * weighted).sum().to(hidden.dtype), ce_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce_sums):
        if hasattr(ctx, "grads"):
            return (*ctx.grads.release(grad_loss), None, None, None)
        return (*_replay_none_backward(ctx, grad_loss), None, None, None)


def _replay_none_backward(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of ``reduction="none"``: rerun the chunk loop with the per-row incoming gradient."""
    hidden, weight, bias = ctx.saved_tensors
    layout, rows, targets, forward_result, token_args, options, chunk_rows = ctx.replay
    dim = hidden.shape[-1]
    row_grad = grad_loss.reshape(-1)[rows].to(forward_result.ce.dtype)
    flags = options.grad_flags
    result = _linear_pass(
        hidden.reshape(-1, dim),
        weight,
        bias,
        rows,
        targets,
        row_grad,
        RowWeights(forward_result.row_weight, None),
        options.impl,
        chunk_rows,
        flags[:3],
    )
    token_grads = token_weight_grads(
        layout, rows, row_grad * forward_result.ce, *token_args, needs=flags[3:6]
    )
    grad_hidden = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
    grad_bias = None if result.grad_bias is None else result.grad_bias.to(bias.dtype)
    return [grad_hidden, result.grad_weight, grad_bias, *token_grads]


def _grad_flags(*tensors: torch.Tensor | None) -> tuple[bool, ...]:
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


def fused_weighted_mtp_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    beta: float = 0.9,
    min_weight: float = 0.1,
    max_weight: float = 5.0,
    terminal: str = "last_state",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """H-offset weighted multi-token cross-entropy of ``hidden @ W.T (+ b)``, logits never materialised.

    Same semantics as :func:`wmtp_kernels.reference.weighted_mtp_loss_from_hidden` (SPEC §2): head k at
    position t predicts ``labels[t + k]`` with weight ``weights[t + k - 1]`` (given, built from
    ``values`` / ``rewards`` by the clipped exponential TD weighting, or uniform when neither is given).
    Gradients reach ``hidden``, ``lm_head_weight``, ``lm_head_bias`` and, when they require grad,
    ``weights`` or ``values`` / ``rewards``; they are computed in the forward pass (see the module doc).

    Args:
        hidden: ``[B, T, H, d]`` final-normed hidden states of the H heads (a non-contiguous tensor is
            copied).
        lm_head_weight: ``[V, d]`` shared unembedding, dtype of ``hidden``.
        labels: ``[B, T]`` int token ids (prompt tokens set to ``ignore_index``).
        attention_mask: ``[B, T]``, nonzero for real tokens; ``None`` means all real.
        weights: ``[B, T]`` token weights; or give ``values`` and ``rewards``; neither means uniform.
        values: ``[B, T(, 1)]`` critic values for TD weights computed per row in the kernel.
        rewards: ``[B]`` sequence rewards, with ``values``.
        gamma: TD discount.
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention, ``"last_state"`` or ``"last_transition"``.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B, T, H]``, zero where not valid).
        return_stats: Also return per-head unweighted CE and weight (and TD) statistics, with the keys
            of the reference.
        lm_head_bias: Optional ``[V]`` bias.
        chunk_size: Rows per chunk; ``None`` derives it from :data:`CHUNK_BUDGET_BYTES`.
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton for CUDA tensors, torch otherwise).
        check_finite: Raise ``ValueError`` if an input holds NaN / Inf (one extra read of the inputs).

    Returns:
        The loss in the dtype of ``hidden`` (scalar, or ``[B, T, H]`` for ``none``); with
        ``return_stats`` a tuple ``(loss, stats)``.
    """
    check_hidden_inputs(
        hidden,
        lm_head_weight,
        lm_head_bias,
        labels,
        attention_mask,
        weights,
        values,
        rewards,
        ignore_index,
        reduction,
    )
    weighting = WeightingOptions(gamma, beta, min_weight, max_weight, terminal)
    check_chunk_size(chunk_size)
    check_same_device(
        hidden.device,
        lm_head_bias=lm_head_bias,
        attention_mask=attention_mask,
        weights=weights,
        values=values,
        rewards=rewards,
    )
    if check_finite:
        _validation.check_finite(
            hidden=hidden,
            lm_head_weight=lm_head_weight,
            lm_head_bias=lm_head_bias,
            weights=weights,
            values=values,
            rewards=rewards,
        )
    differentiable = (hidden, lm_head_weight, lm_head_bias, weights, values, rewards)
    options = LossOptions(
        weighting=weighting,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=resolve_impl(impl, hidden.device),
        chunk_rows=chunk_size,
        grad_flags=_grad_flags(*differentiable),
    )
    loss, ce_sums = _FusedWeightedMTPLoss.apply(*differentiable, labels, attention_mask, options)
    if not return_stats:
        return loss
    layout = build_row_layout(labels, attention_mask, hidden.shape[2], ignore_index)
    head_ce = ce_sums / layout.head_counts.clamp(min=1)
    stats = loss_stats(head_ce, labels, attention_mask, weights, values, rewards, weighting, ignore_index)
    return loss, stats


class FusedWeightedMTPLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_weighted_mtp_loss` holding the options (no parameters).

    Args:
        gamma: TD discount.
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size: Rows per chunk, or ``None`` for the memory-budget default.
        impl: ``"triton"``, ``"torch"`` or ``None`` (automatic).
    """

    def __init__(
        self,
        gamma: float = 1.0,
        beta: float = 0.9,
        min_weight: float = 0.1,
        max_weight: float = 5.0,
        terminal: str = "last_state",
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        chunk_size: int | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        WeightingOptions(gamma, beta, min_weight, max_weight, terminal)
        check_chunk_size(chunk_size)
        self.options = {
            "gamma": gamma,
            "beta": beta,
            "min_weight": min_weight,
            "max_weight": max_weight,
            "terminal": terminal,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "impl": impl,
        }

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        lm_head_bias: torch.Tensor | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """The loss (see :func:`fused_weighted_mtp_loss` for the arguments).

        Args:
            hidden: ``[B, T, H, d]``.
            lm_head_weight: ``[V, d]``.
            labels: ``[B, T]``.
            attention_mask: ``[B, T]`` or ``None``.
            weights: ``[B, T]`` token weights or ``None``.
            values: Critic values or ``None``.
            rewards: Rewards or ``None``.
            lm_head_bias: ``[V]`` or ``None``.
            return_stats: Also return the statistics.

        Returns:
            As :func:`fused_weighted_mtp_loss`.
        """
        return fused_weighted_mtp_loss(
            hidden,
            lm_head_weight,
            labels,
            attention_mask,
            weights,
            values,
            rewards,
            lm_head_bias=lm_head_bias,
            return_stats=return_stats,
            **self.options,
        )

    def extra_repr(self) -> str:
        """The options, for ``print(module)``."""
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
