"""The linear-fused loss as ``torch.library`` custom operators, so that it traces and compiles.

``wmtp::fused_weighted_mtp_loss`` runs the whole chunk loop (:mod:`wmtp_kernels._linear_pass`) as one
opaque operator: ``torch.compile(fullgraph=True)``, ``make_fx`` and ``FakeTensorMode`` see only its
registered fake implementation, whose output shapes depend on the input shapes alone, so the number
of valid tokens never causes a graph break or a recompilation. Everything that reads tensor data (the
label range, finite rewards, ``check_finite``, the compaction of the valid rows) happens inside.

Outputs, in the layout of :func:`wmtp_kernels._autograd.forward_outputs`: ``loss`` (float32, float64 for
float64 inputs), ``head_ce``, ``row_ce`` / ``row_weight`` (``reduction="none"`` only) and the gradients
of hidden, weight, bias, token weights, values, rewards (empty where not requested). The autograd
formula (the shared skeleton) hands those gradients over; for ``none``,
``wmtp::fused_weighted_mtp_loss_backward`` reruns the chunk loop with the incoming gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from wmtp_kernels import _autograd, _validation
from wmtp_kernels._common import LossOptions, RowWeights
from wmtp_kernels._linear_pass import default_chunk_rows, linear_pass
from wmtp_kernels._rows import RowLayout, build_row_layout, compute_dtype, td_row_inputs

N_DIFFERENTIABLE = 6  # hidden, weight, bias, weights, values, rewards


def _no_autocast(device: torch.device):
    """The chunk loop picks its own dtypes: an enclosing autocast must not recast its GEMMs."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _run_pass(hidden, weight, bias, rows, targets, scale, source, options, need):
    dim = hidden.shape[-1]
    chunk_rows = options.chunk_rows or default_chunk_rows(
        weight.shape[0], weight.element_size(), hidden.device.type
    )
    bias_c = None if bias is None else bias.to(weight.dtype)
    with _no_autocast(hidden.device):
        result = linear_pass(
            hidden.reshape(-1, dim),
            weight,
            bias_c,
            rows,
            targets,
            scale,
            source,
            options.impl,
            chunk_rows,
            need,
        )
    grad_hidden = None if result.grad_hidden is None else result.grad_hidden.view(hidden.shape)
    grad_bias = None if result.grad_bias is None else result.grad_bias.to(bias.dtype)
    return result, [grad_hidden, result.grad_weight, grad_bias]


def _raise_on_bad_data(found, hidden, weight, bias, weights, values, rewards, labels, options) -> None:
    """Raise for the data problems counted on the device and read with the valid-row count (the label
    range, the rewards); then ``check_finite``, if asked, with its own synchronisation."""
    _validation.raise_data_problems(found, labels, weight.shape[0], options.ignore_index, rewards)
    if options.check_finite:
        _validation.check_finite(
            hidden=hidden, lm_head_weight=weight, lm_head_bias=bias, weights=weights, values=values
        )


def _checked_valid_rows(layout, hidden, weight, bias, weights, values, rewards, labels, options):
    """The valid rows, once the inputs passed the checks that read data (one synchronisation)."""
    problems = _validation.data_problem_counts(labels, weight.shape[0], options.ignore_index, rewards)
    n_valid, *found = torch.cat([layout.valid.sum().view(1), problems]).tolist()
    _raise_on_bad_data(found, hidden, weight, bias, weights, values, rewards, labels, options)
    return layout.valid_rows(n_valid)


def _kernel_plan(
    hidden, weight, bias, weights, values, rewards, labels, attention_mask, target_counts, options
):
    """The Triton path's plan from the row kernels (:mod:`wmtp_kernels._triton_rows`): two launches and
    one synchronisation, which reads the valid-row count with the data checks' counts."""
    from wmtp_kernels import _triton_rows

    batch, seq, heads, _ = hidden.shape
    vocab, ignore_index = weight.shape[0], options.ignore_index
    source = "td" if values is not None else "weights" if weights is not None else "uniform"
    mean = options.reduction == "mean"
    buffers = _triton_rows.plan_rows(
        labels, attention_mask, heads, vocab, ignore_index, source, weights, rewards, target_counts, mean
    )
    n_valid, *found = buffers.counts[: _triton_rows.N_TOTALS].tolist()
    _raise_on_bad_data(found, hidden, weight, bias, weights, values, rewards, labels, options)
    head_counts = buffers.counts[_triton_rows.N_TOTALS :]
    layout = RowLayout(batch, seq, heads, valid=None, targets=None, head_counts=head_counts)
    rows = buffers.rows[:n_valid]
    if source == "td":
        row_b_j = (buffers.row_b[:n_valid], buffers.row_j[:n_valid])
        td = td_row_inputs(layout, values, rewards, attention_mask, options.weighting, row_b_j=row_b_j)
        row_source = RowWeights(None, td)
    elif source == "weights":
        row_source = RowWeights(buffers.weights[:n_valid], None)
    else:
        row_source = RowWeights(torch.ones(n_valid, device=rows.device), None)
    return _autograd.LossPlan(layout, rows, buffers.targets[:n_valid], buffers.scale[:n_valid], row_source)


def _torch_plan(
    hidden, weight, bias, weights, values, rewards, labels, attention_mask, target_counts, options
):
    layout = build_row_layout(labels, attention_mask, hidden.shape[2], options.ignore_index)
    rows = _checked_valid_rows(layout, hidden, weight, bias, weights, values, rewards, labels, options)
    token_inputs = (weights, values, rewards, attention_mask)
    dtype = compute_dtype(weight.dtype)
    return _autograd.plan_loss(layout, rows, *token_inputs, options, dtype, target_counts)


def forward(hidden, weight, bias, weights, values, rewards, labels, attention_mask, target_counts, options):
    """The operator's computation (see the module doc for the outputs)."""
    inputs = (hidden, weight, bias, weights, values, rewards, labels, attention_mask, target_counts, options)
    kernels_plan = options.impl == "triton" and compute_dtype(weight.dtype) == torch.float32
    plan = _kernel_plan(*inputs) if kernels_plan else _torch_plan(*inputs)
    token_inputs = (weights, values, rewards, attention_mask)
    need = (False,) * 3 if options.reduction == "none" else options.grad_flags[:3]
    rows, targets, scale = plan.rows, plan.targets, plan.scale
    result, large = _run_pass(hidden, weight, bias, rows, targets, scale, plan.source, options, need)
    return _autograd.forward_outputs(plan, result.ce, result.row_weight, large, token_inputs, options)


def replay_none(inputs, row_ce, row_weight, grad_loss, options):
    """Gradients of ``reduction="none"``: the chunk loop again, scaled by the per-row incoming gradient.

    Args:
        inputs: ``(hidden, weight, bias, weights, values, rewards, labels, attention_mask)``.
        row_ce: ``[N]`` per-row CE of the forward pass.
        row_weight: ``[N]`` per-row weights of the forward pass.
        grad_loss: ``[B, T, H]`` incoming gradient.
        options: Loss options.

    Returns:
        The six gradients of the differentiable inputs (empty where not requested).
    """
    hidden, weight, bias, weights, values, rewards, labels, attention_mask = inputs
    layout = build_row_layout(labels, attention_mask, hidden.shape[2], options.ignore_index)
    rows = layout.valid_rows()
    row_grad = grad_loss.reshape(-1).to(row_ce.dtype)
    source = RowWeights(row_weight[rows], None)
    need = options.grad_flags[:3]
    _, large = _run_pass(
        hidden, weight, bias, rows, layout.targets[rows], row_grad[rows], source, options, need
    )
    token_inputs = (weights, values, rewards, attention_mask)
    token_grads = _autograd.replay_token_grads(
        labels, hidden.shape[2], row_grad * row_ce, token_inputs, options
    )
    return [row_ce.new_empty(0) if g is None else g for g in (*large, *token_grads)]


# The differentiable inputs and the options (LossOptions.op_args()), in the schema of both operators.
_INPUTS = "Tensor hidden, Tensor weight, Tensor? bias, Tensor? weights, Tensor? values, Tensor? rewards"
_OPTIONS = (
    "float gamma, float beta, float min_weight, float max_weight, str terminal, int ignore_index, "
    "str reduction, str impl, int chunk_rows, bool[] grad_flags, bool check_finite"
)
_GRADS = ", ".join(["Tensor"] * N_DIFFERENTIABLE)


def _fused_loss(*args):
    """Loss, statistics and gradients of the linear-fused weighted MTP loss (see the module doc)."""
    return tuple(forward(*args[:9], LossOptions.from_op_args(*args[9:])))


def _fused_loss_backward(*args):
    """Gradients of hidden, weight, bias, weights, values, rewards for ``reduction="none"``."""
    return tuple(replay_none(args[:8], *args[8:11], LossOptions.from_op_args(*args[11:])))


fused_loss_op = torch.library.custom_op(
    "wmtp::fused_weighted_mtp_loss",
    _fused_loss,
    mutates_args=(),
    schema=f"({_INPUTS}, Tensor labels, Tensor? attention_mask, Tensor? target_counts, {_OPTIONS}) "
    f"-> (Tensor, Tensor, Tensor, Tensor, {_GRADS})",
)
fused_loss_backward_op = torch.library.custom_op(
    "wmtp::fused_weighted_mtp_loss_backward",
    _fused_loss_backward,
    mutates_args=(),
    schema=f"({_INPUTS}, Tensor labels, Tensor? attention_mask, Tensor row_ce, Tensor row_weight, "
    f"Tensor grad_loss, {_OPTIONS}) -> ({_GRADS})",
)


def _fake_grads(differentiable, flags, like: Tensor) -> list[Tensor]:
    return [t.new_empty(t.shape) if need else like.new_empty(0) for t, need in zip(differentiable, flags)]


@fused_loss_op.register_fake
def _(*args):
    hidden, weight = args[:2]
    options = LossOptions.from_op_args(*args[9:])
    batch, seq, heads, _ = hidden.shape
    scalar = hidden.new_empty((), dtype=compute_dtype(weight.dtype))
    head_ce = hidden.new_empty(heads, dtype=torch.float64)
    if options.reduction == "none":
        loss = scalar.new_empty(batch, seq, heads)
        per_row = [scalar.new_empty(batch * seq * heads) for _ in range(2)]
        return (loss, head_ce, *per_row, *(scalar.new_empty(0) for _ in range(N_DIFFERENTIABLE)))
    grads = _fake_grads(args[:N_DIFFERENTIABLE], options.grad_flags, scalar)
    return (scalar, head_ce, scalar.new_empty(0), scalar.new_empty(0), *grads)


@fused_loss_backward_op.register_fake
def _(*args):
    flags = LossOptions.from_op_args(*args[11:]).grad_flags
    return tuple(_fake_grads(args[:N_DIFFERENTIABLE], flags, args[8]))


def _setup_context(ctx, inputs, output) -> None:
    options = LossOptions.from_op_args(*inputs[9:])
    if options.reduction == "none":
        ctx.save_for_backward(*inputs[:8])  # hidden .. attention_mask
        ctx.scalars = inputs[9:]
    _autograd.save_for_backward(ctx, output, options, len(inputs), _replay)


def _replay(ctx, grad_loss: Tensor) -> list[Tensor | None]:
    grads = fused_loss_backward_op(*ctx.saved_tensors, ctx.row_ce, ctx.row_weight, grad_loss, *ctx.scalars)
    flags = LossOptions.from_op_args(*ctx.scalars).grad_flags
    return [g if need else None for g, need in zip(grads, flags)]


fused_loss_op.register_autograd(_autograd.backward, setup_context=_setup_context)
