"""Linear-fused weighted MTP loss: ``hidden @ W.T`` and the H-offset weighted cross-entropy, chunked.

The logits are never materialised: one custom operator (:mod:`wmtp_kernels._linear_op`) runs the chunk
loop (:mod:`wmtp_kernels._linear_pass`) and computes the loss and every gradient in the forward pass,
so backward only scales them by the incoming gradient and hands them over. ``reduction="none"`` is the
exception: its gradient depends on the per-position incoming gradient, so the forward pass computes only
the losses and backward runs the chunk loop again (4 GEMMs in all).

Drop-in properties (each tested): ``torch.compile(fullgraph=True)`` and ``FakeTensorMode`` trace it
without a host synchronisation (checks that read data run inside the operator) and without recompiling
when the number of valid tokens changes; under autocast a float32 ``lm_head_weight`` with bfloat16
hidden states is used as is (hidden rows are cast per chunk; the weight gradient stays float32); the
loss is float32 for every input dtype (float64 for float64); activation checkpointing never recomputes
it for ``mean`` / ``sum`` (nothing is saved for backward); ``count_mtp_targets`` + ``target_counts``
normalise exactly over accumulated micro-batches; second-order gradients are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from wmtp_kernels import _validation
from wmtp_kernels._common import (
    LossOptions,
    check_chunk_size,
    check_same_device,
    resolve_impl,
    weighting_options,
)
from wmtp_kernels._linear_op import fused_loss_op
from wmtp_kernels._validation import check_hidden_inputs
from wmtp_kernels.options import IGNORE_INDEX, WeightingOptions
from wmtp_kernels.stats import loss_stats

SHARDED_WEIGHT_HELP = (
    "the fused loss needs the full, local lm_head weight. Two patterns work with FSDP2: call the loss "
    "inside the forward of the module that owns the weight (fully_shard gathers its parameters for that "
    "forward and reduce-scatters their gradients after backward), or call it from a method registered "
    "with torch.distributed.fsdp.register_fsdp_forward_method(module, 'method_name'). Passing "
    "weight.full_tensor() or calling module.unshard() by hand does not reduce-scatter the gradient "
    "(wrong or lost gradients)"
)


def _refuse_dtensors(**tensors: torch.Tensor | None) -> None:
    """Raise a ``TypeError`` naming the first sharded (DTensor) argument and the patterns that work."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise TypeError(
                f"{name} is a DTensor {list(t.shape)} sharded as {t.placements}: {SHARDED_WEIGHT_HELP}"
            )


def _check_target_counts(target_counts: torch.Tensor | None, heads: int, reduction: str) -> None:
    if target_counts is None:
        return
    if not isinstance(target_counts, torch.Tensor) or target_counts.shape != (heads,):
        shape = list(target_counts.shape) if isinstance(target_counts, torch.Tensor) else type(target_counts)
        raise ValueError(f"target_counts must be a tensor of shape [H] = [{heads}], got {shape}")
    if reduction != "mean":
        raise ValueError(f"target_counts sets the divisor of reduction='mean'; got reduction={reduction!r}")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and is_fake(t)


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
    target_counts: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """H-offset weighted multi-token cross-entropy of ``hidden @ W.T (+ b)``, logits never materialised.

    Same semantics as :func:`wmtp_kernels.reference.weighted_mtp_loss_from_hidden` (docs/DESIGN.md
    "§ H-offset alignment"): head k at position t predicts ``labels[t + k]`` with weight
    ``weights[t + k - 1]`` (given, built from ``values`` / ``rewards`` by the clipped exponential TD
    weighting, or uniform when neither is given).
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
        target_counts: ``[H]`` per-head counts that ``mean`` divides by instead of this batch's own,
            e.g. :func:`wmtp_kernels.count_mtp_targets` summed over accumulated micro-batches.

    Returns:
        The loss in float32 (float64 for float64 inputs), scalar or ``[B, T, H]`` for ``none``; with
        ``return_stats`` a tuple ``(loss, stats)``. The statistics are Python floats, read back from
        the device: under ``torch.compile`` they cause a graph break (leave ``return_stats`` off inside
        a ``fullgraph`` region) and under ``FakeTensorMode`` they are refused.

    Raises:
        TypeError: a sharded (DTensor) ``lm_head_weight``; the message names the patterns that work.
    """
    _refuse_dtensors(hidden=hidden, lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias)
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
        read_data=False,  # the label range and finite rewards are checked inside the operator
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
        target_counts=target_counts,
    )
    _check_target_counts(target_counts, hidden.shape[2], reduction)
    differentiable = (hidden, lm_head_weight, lm_head_bias, weights, values, rewards)
    loss_options = LossOptions(
        weighting=weighting,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=resolve_impl(impl, hidden.device),
        chunk_rows=chunk_size,
        grad_flags=_grad_flags(*differentiable),
        check_finite=check_finite,
    )
    outputs = fused_loss_op(*differentiable, labels, attention_mask, target_counts, *loss_options.op_args())
    loss, head_ce = outputs[0], outputs[1]
    if not return_stats:
        return loss
    if _is_fake(head_ce):
        raise ValueError(
            "return_stats=True returns Python floats read from the device, which fake tensors do not "
            "have; call with return_stats=False under FakeTensorMode"
        )
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
