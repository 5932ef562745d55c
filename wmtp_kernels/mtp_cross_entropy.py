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

from wmtp_kernels import _torch_path, _validation
from wmtp_kernels._common import (
    LossOptions,
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
from wmtp_kernels._validation import check_logits_inputs
from wmtp_kernels.mtp_loss import default_chunk_rows
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions
from wmtp_kernels.stats import loss_stats


class _WeightedMTPCrossEntropy(torch.autograd.Function):
    """Inputs: logits, weights, values, rewards (differentiable), labels, mask, options, inplace."""

    @staticmethod
    def forward(ctx, logits, weights, values, rewards, labels, attention_mask, options, inplace):
        batch, seq, heads, vocab = logits.shape
        layout = build_row_layout(labels, attention_mask, heads, options.ignore_index)
        n_rows = layout.n_rows
        rows = torch.arange(n_rows, device=logits.device)
        dtype = compute_dtype(logits.dtype)
        scale = row_scale(layout, options.reduction, dtype)
        source = row_weights(layout, rows, weights, values, rewards, attention_mask, options.weighting, dtype)
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
            weights_c, td_c = source.chunk(part)
            ce[part], row_weight[part] = chunk_fn(buf, layout.targets[part], scale[part], weights_c, td_c)
        ce_sums = head_ce_sums(layout, rows, ce)
        ctx.mark_non_differentiable(ce_sums)
        weighted = ce * row_weight
        token_args = (weights, values, rewards, attention_mask, options.weighting)
        if options.reduction == "none":
            ctx.replay = (layout, rows, ce, token_args, options, need_grad)
            ctx.work = work if need_grad else None
            loss = weighted.view(batch, seq, heads).to(logits.dtype)
            return loss, ce_sums
        token_grads = token_weight_grads(layout, rows, scale * ce, *token_args, needs=options.grad_flags[1:4])
        ctx.grads = StoredGrads([work.view(logits.shape) if need_grad else None], list(token_grads))
        del work
        return (scale * weighted).sum().to(logits.dtype), ce_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce_sums):
        if hasattr(ctx, "grads"):
            return (*ctx.grads.release(grad_loss), None, None, None, None)
        layout, rows, ce, token_args, options, need_grad = ctx.replay
        row_grad = grad_loss.reshape(-1).to(ce.dtype)
        grad_logits = None
        if need_grad:
            work, ctx.work = ctx.work, None  # hand the buffer over: no reference may stay on ctx
            if work is None:
                raise RuntimeError(
                    "the gradient buffer of weighted_mtp_cross_entropy was handed over by the first "
                    "backward; to backpropagate again, compute the loss again"
                )
            grad_logits = work.mul_(row_grad[:, None]).view(grad_loss.shape + work.shape[-1:])
        token_grads = token_weight_grads(
            layout, rows, row_grad * ce, *token_args, needs=options.grad_flags[1:4]
        )
        return (grad_logits, *token_grads, None, None, None, None)


def weighted_mtp_cross_entropy(
    logits: torch.Tensor,
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
    chunk_size: int | None = None,
    impl: str | None = None,
    inplace: bool = True,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """H-offset weighted multi-token cross-entropy from logits, without a softmax tensor.

    Same semantics as :func:`wmtp_kernels.reference.weighted_mtp_cross_entropy` (SPEC §2). See the
    module doc for what ``inplace`` does to the caller's logits.

    Args:
        logits: ``[B, T, H, V]`` float32 / bfloat16 / float16.
        labels: ``[B, T]`` int token ids.
        attention_mask: ``[B, T]``, nonzero for real tokens; ``None`` means all real.
        weights: ``[B, T]`` token weights; or ``values`` and ``rewards``; neither means uniform.
        values: ``[B, T(, 1)]`` critic values (TD weights computed per row).
        rewards: ``[B]`` sequence rewards, with ``values``.
        gamma: TD discount.
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention, ``"last_state"`` or ``"last_transition"``.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B, T, H]``).
        return_stats: Also return per-head CE and weight (and TD) statistics, keys as the reference.
        chunk_size: Rows per chunk (bounds the scratch buffer when no gradient is needed).
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton for CUDA tensors, torch otherwise).
        inplace: Write the gradient into the logits buffer (default) or into a new tensor.
        check_finite: Raise ``ValueError`` if an input holds NaN / Inf.

    Returns:
        The loss in the dtype of ``logits`` (scalar, or ``[B, T, H]`` for ``none``); with
        ``return_stats`` a tuple ``(loss, stats)``.

    Raises:
        ValueError: bad shapes / options, or ``inplace=True`` with logits that are a leaf requiring grad.
    """
    check_logits_inputs(logits, labels, attention_mask, weights, values, rewards, ignore_index, reduction)
    weighting = WeightingOptions(gamma, beta, min_weight, max_weight, terminal)
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
    options = LossOptions(
        weighting=weighting,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=resolve_impl(impl, logits.device),
        chunk_rows=chunk_size,
        grad_flags=grad_flags,
    )
    loss, ce_sums = _WeightedMTPCrossEntropy.apply(*differentiable, labels, attention_mask, options, inplace)
    if not return_stats:
        return loss
    layout = build_row_layout(labels, attention_mask, logits.shape[2], ignore_index)
    head_ce = ce_sums / layout.head_counts.clamp(min=1)
    stats = loss_stats(head_ce, labels, attention_mask, weights, values, rewards, weighting, ignore_index)
    return loss, stats
