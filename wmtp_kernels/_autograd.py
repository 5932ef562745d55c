"""The one forward / backward skeleton of both entry points (linear-fused and from logits).

Forward, for either entry point:

1. the entry point builds the row layout once and chooses its rows; :func:`plan_loss` gives them
   targets, per-row scales and the weight source;
2. the entry point runs its chunk loop over the plan's rows (per-row CE, row weight, the gradients of
   its large inputs: hidden / weight / bias, or logits);
3. :func:`forward_outputs` reduces the loss, the per-head mean CE (for ``return_stats``, so the layout
   is never rebuilt for statistics) and the gradients of the token weights / values / rewards, into one
   output layout: ``(loss, head_ce, row_ce, row_weight, *grads)``.

Backward: :func:`save_for_backward` keeps the forward-computed gradients on ``ctx`` (nothing is
*saved* for autograd, so activation checkpointing has nothing to recompute) and :func:`backward` scales
them by the incoming gradient and hands the large ones over without a copy. ``reduction="none"`` is the
exception: its gradient depends on the per-position incoming gradient, so the entry point's ``replay``
computes it in backward from the per-row CE and weights of the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wmtp_kernels._common import LossOptions, RowWeights, head_ce_sums, row_weights, token_weight_grads
from wmtp_kernels._rows import RowLayout, build_row_layout, row_scale

# Outputs before the gradients: loss, head_ce, row_ce, row_weight.
N_VALUE_OUTPUTS = 4
# The small, [B, T]-sized gradients (token weights, values, rewards) come last among the inputs.
N_TOKEN_INPUTS = 3


@dataclass(frozen=True)
class LossPlan:
    """The rows one loss call processes, built once per call.

    Attributes:
        layout: Row layout of all ``N = B * T * H`` rows.
        rows: ``[R]`` int64 processed rows (the valid ones, or all ``N``).
        targets: ``[R]`` int64 target ids.
        scale: ``[R]`` per-row loss scale (0 on invalid rows).
        source: Per-row weight source.
    """

    layout: RowLayout
    rows: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor
    source: RowWeights


def plan_loss(
    layout: RowLayout,
    rows: torch.Tensor,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    options: LossOptions,
    dtype: torch.dtype,
    target_counts: torch.Tensor | None = None,
) -> LossPlan:
    """The :class:`LossPlan` of one call.

    Args:
        layout: The call's row layout (:func:`~wmtp_kernels._rows.build_row_layout`, built once).
        rows: The processed rows: the valid ones (linear-fused) or all ``N`` (logits).
        weights: ``[B, T]`` token weights or ``None``.
        values: Critic values or ``None``.
        rewards: Rewards or ``None``.
        attention_mask: ``[B, T]`` mask or ``None``.
        options: Loss options.
        dtype: Dtype of per-row quantities.
        target_counts: ``[H]`` per-head counts that ``mean`` divides by, or ``None`` (this batch's).

    Returns:
        The plan.
    """
    scale = row_scale(layout, options.reduction, dtype, target_counts)[rows]
    source = row_weights(layout, rows, weights, values, rewards, attention_mask, options.weighting, dtype)
    return LossPlan(layout, rows, layout.targets[rows], scale, source)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def forward_outputs(
    plan: LossPlan,
    ce: torch.Tensor,
    row_weight: torch.Tensor,
    large_grads: list[torch.Tensor | None],
    token_inputs: tuple,
    options: LossOptions,
) -> tuple[torch.Tensor, ...]:
    """The forward outputs ``(loss, head_ce, row_ce, row_weight, *grads)`` of either entry point.

    Args:
        plan: The call's plan.
        ce: ``[R]`` unweighted cross-entropy of the plan's rows.
        row_weight: ``[R]`` weight of each of the plan's rows.
        large_grads: Gradients of the large inputs (``None`` where not needed, and with ``none``).
        token_inputs: ``(weights, values, rewards, attention_mask)``.
        options: Loss options.

    Returns:
        ``loss`` (scalar, or ``[B, T, H]`` for ``none``), ``head_ce`` (``[H]`` float64 mean CE of each
        head's valid rows), ``row_ce`` / ``row_weight`` (``[N]``, only for ``none``, else empty) and the
        gradients of every differentiable input (empty where not computed).
    """
    layout, rows = plan.layout, plan.rows
    head_ce = head_ce_sums(layout, rows, ce) / layout.head_counts.clamp(min=1)
    weighted = ce * row_weight
    if options.reduction == "none":  # separate tensors: outputs of a custom operator may not alias
        loss, row_ce, row_w = (
            ce.new_zeros(layout.n_rows).index_copy_(0, rows, x) for x in (weighted, ce, row_weight)
        )
        loss = loss.view(layout.batch, layout.seq, layout.heads)
        large = [_empty(ce) if g is None else g for g in large_grads]
        return (loss, head_ce, row_ce, row_w, *large, *(_empty(ce) for _ in range(N_TOKEN_INPUTS)))
    token_grads = token_weight_grads(
        layout,
        rows,
        plan.scale * ce,
        *token_inputs,
        options.weighting,
        needs=options.grad_flags[-N_TOKEN_INPUTS:],
    )
    grads = [_empty(ce) if g is None else g for g in (*large_grads, *token_grads)]
    return ((plan.scale * weighted).sum(), head_ce, _empty(ce), _empty(ce), *grads)


ScaleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _multiply_(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return x.mul_(grad.to(x.dtype))


def _large_grad_scaler(impl: str) -> ScaleFn:
    """How backward scales the large gradients in place: the Triton path's kernel skips an incoming
    gradient of 1 on the device (:mod:`wmtp_kernels._triton_scale`)."""
    if impl != "triton":
        return _multiply_
    from wmtp_kernels._triton_scale import scale_unless_one_

    return scale_unless_one_


class StoredGrads:
    """Gradients computed in the forward pass, handed to autograd by ``backward``.

    The large ones (hidden, weight, bias, logits) are released on the first backward, so that nothing
    but autograd references them and it takes them over without a copy; they are scaled in place by the
    incoming gradient. The small ``[B, T]`` ones (token weights, values, rewards) stay, so a second
    backward through a retained graph (e.g. ``gradcheck``) works when only they are needed.

    Args:
        large: Large gradients (or ``None`` entries).
        small: Small gradients (or ``None`` entries).
    """

    def __init__(
        self, large: list[torch.Tensor | None], small: list[torch.Tensor | None], scale_: ScaleFn = _multiply_
    ) -> None:
        self.large: list[torch.Tensor | None] | None = large
        self.scale_ = scale_
        self.small = small
        self.needs_large = any(g is not None for g in large)
        self.n_large = len(large)

    def release(self, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
        """All gradients times ``grad_output`` (a scalar), large ones handed over.

        Args:
            grad_output: The incoming gradient of the scalar loss.

        Returns:
            ``large + small`` gradients.
        """
        if self.large is None:
            if self.needs_large:
                raise RuntimeError(
                    "the fused WMTP loss computes its gradients in the forward pass and hands them over "
                    "on the first backward; to backpropagate again, compute the loss again"
                )
            large = [None] * self.n_large
        else:
            large, self.large = self.large, None
            for g in large:
                if g is not None:
                    self.scale_(g, grad_output)
        small = [None if g is None else g * grad_output.to(g.dtype) for g in self.small]
        return large + small


Replay = Callable[[object, torch.Tensor], list[torch.Tensor | None]]


def save_for_backward(
    ctx, output: tuple[torch.Tensor, ...], options: LossOptions, n_inputs: int, replay: Replay | None
) -> None:
    """``setup_context`` of both entry points: keep what :func:`backward` needs on ``ctx``.

    Args:
        ctx: The autograd context.
        output: The forward outputs (see :func:`forward_outputs`).
        options: Loss options (``grad_flags`` say which gradients exist).
        n_inputs: Number of forward inputs (``backward`` returns one gradient per input).
        replay: For ``reduction="none"``: ``replay(ctx, grad_loss)`` returns the differentiable inputs'
            gradients; the entry point saves what it reads on ``ctx`` itself.
    """
    _, *others = output
    ctx.mark_non_differentiable(*others)
    ctx.set_materialize_grads(False)  # else autograd builds zero "gradients" of the [V, d] / [N, d] outputs
    ctx.n_inputs = n_inputs
    grads = [g if need else None for g, need in zip(output[N_VALUE_OUTPUTS:], options.grad_flags)]
    if options.reduction == "none":
        ctx.replay = replay
        ctx.row_ce, ctx.row_weight = output[2], output[3]
        ctx.pending = grads[:-N_TOKEN_INPUTS]  # unscaled large gradients, if the entry point has them
        return
    ctx.replay = None
    ctx.grads = StoredGrads(
        grads[:-N_TOKEN_INPUTS], grads[-N_TOKEN_INPUTS:], _large_grad_scaler(options.impl)
    )


def replay_token_grads(
    labels: torch.Tensor,
    heads: int,
    dloss_drow_weight: torch.Tensor,
    token_inputs: tuple,
    options: LossOptions,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the token weights / values / rewards for ``reduction="none"``, in backward.

    Args:
        labels: ``[B, T]`` token ids.
        heads: H.
        dloss_drow_weight: ``[N]`` incoming gradient times CE of every row.
        token_inputs: ``(weights, values, rewards, attention_mask)``.
        options: Loss options.

    Returns:
        ``(d_weights, d_values, d_rewards)``, ``None`` where not needed.
    """
    layout = build_row_layout(labels, token_inputs[3], heads, options.ignore_index)
    rows = torch.arange(layout.n_rows, device=labels.device)
    return token_weight_grads(
        layout,
        rows,
        dloss_drow_weight,
        *token_inputs,
        options.weighting,
        needs=options.grad_flags[-N_TOKEN_INPUTS:],
    )


def backward(ctx, grad_loss: torch.Tensor, *_grad_non_differentiable) -> tuple[torch.Tensor | None, ...]:
    """Backward of both entry points: scale the stored gradients, or replay for ``none``.

    Args:
        ctx: The autograd context filled by :func:`save_for_backward`.
        grad_loss: Incoming gradient of the loss.

    Returns:
        One gradient (or ``None``) per forward input.

    Raises:
        RuntimeError: ``create_graph=True``: the gradients were computed without a graph of their own.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused WMTP loss does not support second-order gradients (backward with "
            "create_graph=True, or torch.autograd.grad(..., create_graph=True)): its gradients are "
            "computed in the forward pass without a graph; use wmtp_kernels.reference for higher-order "
            "derivatives"
        )
    if grad_loss is None:  # no gradient reached the loss (gradients are not materialised as zeros)
        return (None,) * ctx.n_inputs
    grads = ctx.grads.release(grad_loss) if ctx.replay is None else ctx.replay(ctx, grad_loss)
    return (*grads, *[None] * (ctx.n_inputs - len(grads)))
