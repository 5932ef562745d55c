"""Weighted MTP cross-entropy from logits ``[B, T, H, V]``, gradient written in place.

For trainers that already hold the logits. Rows ``(b, t, k)`` are processed in chunks by the chunk
primitive of the chosen backend: a row's log-sum-exp is computed in float32 (online in Triton, one
fused softmax pass per row in torch) and the row is overwritten with its gradient
``(softmax - onehot) * weight * scale``, so no softmax / log-probability tensor is ever allocated.

``inplace=True`` (default, as Liger-Kernel): **the caller's logits buffer is overwritten with the
gradient** when a gradient is needed; do not read the logits after the call. Logits that are a leaf
requiring grad are refused (their buffer would become their own ``.grad``); pass ``inplace=False``,
which writes the gradient into a new ``[B, T, H, V]`` tensor instead. Without a gradient to compute
(no grad mode, nothing requires grad) the logits are only read. Non-contiguous logits are first made
contiguous (a copy, which then holds the gradient).
"""

from __future__ import annotations

import torch

from wmtp_kernels import _autograd, _torch_path, _validation
from wmtp_kernels._common import (
    LossOptions,
    check_chunk_size,
    check_same_device,
    resolve_impl,
    triton_chunk_fn,
    weighting_options,
)
from wmtp_kernels._linear_pass import default_chunk_rows
from wmtp_kernels._rows import build_row_layout, compute_dtype
from wmtp_kernels._validation import check_logits_inputs
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions
from wmtp_kernels.stats import loss_stats

N_INPUTS = 8  # logits, weights, values, rewards (differentiable), labels, mask, options, inplace


def _forward(logits, weights, values, rewards, labels, attention_mask, options, inplace):
    """The loss and (except for ``none``, where it stays unscaled) every gradient, chunk by chunk."""
    heads, vocab = logits.shape[2], logits.shape[3]
    token_inputs = (weights, values, rewards, attention_mask)
    dtype = compute_dtype(logits.dtype)
    layout = build_row_layout(labels, attention_mask, heads, options.ignore_index)
    rows = torch.arange(layout.n_rows, device=labels.device)
    plan = _autograd.plan_loss(layout, rows, *token_inputs, options, dtype)
    n_rows = plan.layout.n_rows
    need_grad = options.grad_flags[0]
    source_2d = logits.reshape(n_rows, vocab)
    step = options.chunk_rows or default_chunk_rows(vocab, logits.element_size(), logits.device.type)
    if need_grad:
        if inplace:
            work = source_2d.contiguous()
            torch.autograd.graph.increment_version(logits)
        else:
            work = torch.empty_like(source_2d, memory_format=torch.contiguous_format)
    else:
        work = torch.empty(min(step, n_rows), vocab, dtype=logits.dtype, device=logits.device)
    chunk_fn = _torch_path.weighted_ce_chunk_ if options.impl == "torch" else triton_chunk_fn()
    ce = torch.empty(n_rows, dtype=dtype, device=logits.device)
    row_weight = torch.empty_like(ce)
    for start in range(0, n_rows, step):
        part = slice(start, min(start + step, n_rows))
        buf = work[part] if need_grad else work[: part.stop - part.start]
        if buf.data_ptr() != source_2d[part].data_ptr():
            buf.copy_(source_2d[part])
        weights_c, td_c = plan.source.chunk(part)
        ce[part], row_weight[part] = chunk_fn(buf, plan.targets[part], plan.scale[part], weights_c, td_c)
    large = [work.view(logits.shape) if need_grad else None]
    return _autograd.forward_outputs(plan, ce, row_weight, large, token_inputs, options)


def _setup_context(ctx, inputs, output) -> None:
    logits, weights, values, rewards, labels, attention_mask, options, _inplace = inputs
    if options.reduction == "none":
        ctx.token_inputs = (weights, values, rewards, attention_mask)
        ctx.labels, ctx.options, ctx.heads = labels, options, logits.shape[2]
    _autograd.save_for_backward(ctx, output, options, N_INPUTS, _scale_none_rows)


def _scale_none_rows(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of ``reduction="none"``: scale each row of the stored gradient by its incoming gradient."""
    row_grad = grad_loss.reshape(-1).to(ctx.row_ce.dtype)
    (work,) = ctx.pending
    ctx.pending = [None]  # hand the buffer over: no reference may stay on ctx
    if work is None and ctx.options.grad_flags[0]:
        raise RuntimeError(
            "the gradient buffer of weighted_mtp_cross_entropy was handed over by the first "
            "backward; to backpropagate again, compute the loss again"
        )
    grad_logits = None if work is None else work.view(row_grad.numel(), -1).mul_(row_grad[:, None])
    grad_logits = None if grad_logits is None else grad_logits.view(work.shape)
    token_grads = _autograd.replay_token_grads(
        ctx.labels, ctx.heads, row_grad * ctx.row_ce, ctx.token_inputs, ctx.options
    )
    return [grad_logits, *token_grads]


class _WeightedMTPCrossEntropy(torch.autograd.Function):
    """Inputs: logits, weights, values, rewards (differentiable), labels, mask, options, inplace."""

    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_autograd.backward)


def weighted_mtp_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    gamma: float | None = None,
    beta: float | None = None,
    min_weight: float | None = None,
    max_weight: float | None = None,
    terminal: str | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    return_stats: bool = False,
    chunk_size: int | None = None,
    impl: str | None = None,
    inplace: bool = True,
    check_finite: bool = False,
    options: WeightingOptions | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """H-offset weighted multi-token cross-entropy from logits, without a softmax tensor.

    Same semantics as :func:`wmtp_kernels.reference.weighted_mtp_cross_entropy` (docs/DESIGN.md
    "§ H-offset alignment"). See the module doc for what ``inplace`` does to the caller's logits.

    Args:
        logits: ``[B, T, H, V]`` float32 / bfloat16 / float16.
        labels: ``[B, T]`` int token ids.
        attention_mask: ``[B, T]``, nonzero for real tokens; ``None`` means all real.
        weights: ``[B, T]`` token weights; or ``values`` and ``rewards``; neither means uniform.
        values: ``[B, T(, 1)]`` critic values (TD weights computed per row).
        rewards: ``[B]`` sequence rewards, with ``values``.
        gamma: TD discount (``None``: the :class:`WeightingOptions` default, 1.0).
        beta: Weight temperature (default 0.9).
        min_weight: Lower weight clip (default 0.1).
        max_weight: Upper weight clip (default 5.0).
        terminal: TD terminal convention, ``"last_state"`` (default) or ``"last_transition"``.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B, T, H]``).
        return_stats: Also return per-head CE and weight (and TD) statistics, keys as the reference.
        chunk_size: Rows per chunk (bounds the scratch buffer when no gradient is needed).
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton for CUDA tensors, torch otherwise).
        inplace: Write the gradient into the logits buffer (default) or into a new tensor.
        check_finite: Raise ``ValueError`` if an input holds NaN / Inf.
        options: The weighting as one :class:`WeightingOptions`, instead of the five keywords above.

    Returns:
        The loss in float32 (float64 for float64 logits), scalar or ``[B, T, H]`` for ``none``; with
        ``return_stats`` a tuple ``(loss, stats)``.

    Raises:
        ValueError: bad shapes / options, or ``inplace=True`` with logits that are a leaf requiring grad.
    """
    check_logits_inputs(logits, labels, attention_mask, weights, values, rewards, ignore_index, reduction)
    weighting = weighting_options(
        options, gamma=gamma, beta=beta, min_weight=min_weight, max_weight=max_weight, terminal=terminal
    )
    check_chunk_size(chunk_size)
    check_same_device(
        logits.device,
        labels=labels,
        attention_mask=attention_mask,
        weights=weights,
        values=values,
        rewards=rewards,
    )
    if check_finite:
        _validation.check_finite(logits=logits, weights=weights, values=values, rewards=rewards)
    grad_enabled = torch.is_grad_enabled()
    differentiable = (logits, weights, values, rewards)
    grad_flags = tuple(grad_enabled and t is not None and t.requires_grad for t in differentiable)
    if inplace and grad_flags[0] and logits.is_leaf:
        raise ValueError(
            f"logits {list(logits.shape)} is a leaf tensor that requires grad: inplace=True would turn its "
            "buffer into its own gradient; pass inplace=False"
        )
    loss_options = LossOptions(
        weighting=weighting,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=resolve_impl(impl, logits.device),
        chunk_rows=chunk_size,
        grad_flags=grad_flags,
    )
    loss, head_ce, *_ = _WeightedMTPCrossEntropy.apply(
        *differentiable, labels, attention_mask, loss_options, inplace
    )
    if not return_stats:
        return loss
    stats = loss_stats(head_ce, labels, attention_mask, weights, values, rewards, weighting, ignore_index)
    return loss, stats
