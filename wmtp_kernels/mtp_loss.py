"""Linear-fused weighted MTP loss: ``hidden @ W.T`` and the H-offset weighted cross-entropy, chunked.

The logits are never materialised: the chunk loop (:mod:`wmtp_kernels._linear_pass`) computes the loss
and every gradient in the forward pass, so backward only scales them by the incoming gradient and hands
them over (the skeleton of :mod:`wmtp_kernels._autograd`). ``reduction="none"`` is the exception: its
gradient depends on the per-position incoming gradient, so the forward pass computes only the losses and
backward runs the chunk loop again (4 GEMMs in all). The loss is returned in the dtype of ``hidden``.
"""

from __future__ import annotations

import torch
from torch import nn

from wmtp_kernels import _autograd, _validation
from wmtp_kernels._common import (
    LossOptions,
    RowWeights,
    check_chunk_size,
    check_same_device,
    resolve_impl,
    weighting_options,
)
from wmtp_kernels._linear_pass import default_chunk_rows, linear_pass
from wmtp_kernels._rows import build_row_layout, compute_dtype
from wmtp_kernels._validation import check_hidden_inputs
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions
from wmtp_kernels.stats import loss_stats

N_INPUTS = 9  # hidden, weight, bias, weights, values, rewards (differentiable), labels, mask, options


def _chunk_rows(hidden: torch.Tensor, weight: torch.Tensor, options: LossOptions) -> int:
    return options.chunk_rows or default_chunk_rows(
        weight.shape[0], hidden.element_size(), hidden.device.type
    )


def _forward(hidden, weight, bias, weights, values, rewards, labels, attention_mask, options):
    """The loss and (except for ``none``) every gradient: outputs of :func:`_autograd.forward_outputs`."""
    heads, dim = hidden.shape[2], hidden.shape[3]
    dtype = compute_dtype(hidden.dtype)
    token_inputs = (weights, values, rewards, attention_mask)
    plan = _autograd.plan_loss(labels, attention_mask, heads, *token_inputs[:3], options, dtype, compact=True)
    need = (False,) * 3 if options.reduction == "none" else options.grad_flags[:3]
    result = linear_pass(
        hidden.reshape(-1, dim),
        weight,
        None if bias is None else bias.to(hidden.dtype),
        plan.rows,
        plan.targets,
        plan.scale,
        plan.source,
        options.impl,
        _chunk_rows(hidden, weight, options),
        need,
    )
    grad_hidden = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
    grad_bias = None if result.grad_bias is None else result.grad_bias.to(bias.dtype)
    large = [grad_hidden, result.grad_weight, grad_bias]
    return _autograd.forward_outputs(plan, result.ce, result.row_weight, large, token_inputs, options)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, weights, values, rewards, labels, attention_mask, options = inputs
    if options.reduction == "none":
        ctx.save_for_backward(hidden, weight, bias)
        ctx.token_inputs = (weights, values, rewards, attention_mask)
        ctx.labels, ctx.options = labels, options
    _autograd.save_for_backward(ctx, output, options, N_INPUTS, _replay_none)


def _replay_none(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of ``reduction="none"``: rerun the chunk loop with the per-row incoming gradient."""
    hidden, weight, bias = ctx.saved_tensors
    options, heads, dim = ctx.options, hidden.shape[2], hidden.shape[3]
    layout = build_row_layout(ctx.labels, ctx.token_inputs[3], heads, options.ignore_index)
    rows = layout.valid_rows()
    row_grad = grad_loss.reshape(-1).to(ctx.row_ce.dtype)
    result = linear_pass(
        hidden.reshape(-1, dim),
        weight,
        None if bias is None else bias.to(hidden.dtype),
        rows,
        layout.targets[rows],
        row_grad[rows],
        RowWeights(ctx.row_weight[rows], None),
        options.impl,
        _chunk_rows(hidden, weight, options),
        options.grad_flags[:3],
    )
    token_grads = _autograd.replay_token_grads(
        ctx.labels, heads, row_grad * ctx.row_ce, ctx.token_inputs, options
    )
    grad_hidden = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
    grad_bias = None if result.grad_bias is None else result.grad_bias.to(bias.dtype)
    return [grad_hidden, result.grad_weight, grad_bias, *token_grads]


class _FusedWeightedMTPLoss(torch.autograd.Function):
    """Inputs: hidden, weight, bias, weights, values, rewards (differentiable), labels, mask, options."""

    forward = staticmethod(_forward)
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_autograd.backward)


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
    gamma: float | None = None,
    beta: float | None = None,
    min_weight: float | None = None,
    max_weight: float | None = None,
    terminal: str | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    return_stats: bool = False,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
    check_finite: bool = False,
    options: WeightingOptions | None = None,
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
        gamma: TD discount (``None``: the :class:`WeightingOptions` default, 1.0).
        beta: Weight temperature (default 0.9).
        min_weight: Lower weight clip (default 0.1).
        max_weight: Upper weight clip (default 5.0).
        terminal: TD terminal convention, ``"last_state"`` (default) or ``"last_transition"``.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B, T, H]``, zero where not valid).
        return_stats: Also return per-head unweighted CE and weight (and TD) statistics, with the keys
            of the reference.
        lm_head_bias: Optional ``[V]`` bias.
        chunk_size: Rows per chunk; ``None`` derives it from the memory budget
            (``wmtp_kernels._linear_pass.CHUNK_BUDGET_BYTES``).
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton for CUDA tensors, torch otherwise).
        check_finite: Raise ``ValueError`` if an input holds NaN / Inf (one extra read of the inputs).
        options: The weighting as one :class:`WeightingOptions`, instead of the five keywords above.

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
    weighting = weighting_options(
        options, gamma=gamma, beta=beta, min_weight=min_weight, max_weight=max_weight, terminal=terminal
    )
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
    loss_options = LossOptions(
        weighting=weighting,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=resolve_impl(impl, hidden.device),
        chunk_rows=chunk_size,
        grad_flags=_grad_flags(*differentiable),
    )
    loss, head_ce, *_ = _FusedWeightedMTPLoss.apply(*differentiable, labels, attention_mask, loss_options)
    loss = loss.to(hidden.dtype)
    if not return_stats:
        return loss
    stats = loss_stats(head_ce, labels, attention_mask, weights, values, rewards, weighting, ignore_index)
    return loss, stats


class FusedWeightedMTPLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_weighted_mtp_loss` holding the options (no parameters).

    Args:
        gamma: TD discount (``None``: the :class:`WeightingOptions` default).
        beta: Weight temperature.
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: TD terminal convention.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size: Rows per chunk, or ``None`` for the memory-budget default.
        impl: ``"triton"``, ``"torch"`` or ``None`` (automatic).
        options: The weighting as one :class:`WeightingOptions`, instead of the five keywords.
    """

    def __init__(
        self,
        gamma: float | None = None,
        beta: float | None = None,
        min_weight: float | None = None,
        max_weight: float | None = None,
        terminal: str | None = None,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        chunk_size: int | None = None,
        impl: str | None = None,
        options: WeightingOptions | None = None,
    ) -> None:
        super().__init__()
        self.weighting = weighting_options(
            options, gamma=gamma, beta=beta, min_weight=min_weight, max_weight=max_weight, terminal=terminal
        )
        _validation.check_reduction(reduction)
        check_chunk_size(chunk_size)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.impl = impl

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
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            return_stats=return_stats,
            lm_head_bias=lm_head_bias,
            chunk_size=self.chunk_size,
            impl=self.impl,
            options=self.weighting,
        )

    def extra_repr(self) -> str:
        """The options, for ``print(module)``."""
        return (
            f"{self.weighting}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"chunk_size={self.chunk_size}, impl={self.impl!r}"
        )
