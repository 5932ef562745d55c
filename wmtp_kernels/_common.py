"""What the linear-fused and the logits entry points share: options, backend choice and the chunk
primitive contract (``ChunkFn``), per-row weights, gradients to the token weights / critic values, and
the per-head cross-entropy sums behind ``return_stats``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wmtp_kernels._rows import RowLayout, TDRowInputs, gather_row_weights, td_row_inputs
from wmtp_kernels.options import WeightingOptions
from wmtp_kernels.td_weights import td_weight_grads

IMPLS = ("triton", "torch")

# The chunk primitive: fn(logits [C, V] (overwritten with the gradient), targets, scale, weights, td)
# -> (ce, row_weight); Triton's weighted_ce_chunk_ and the torch path's twin (linear_chunk_ for the
# linear-fused loop, which defers the row factor to the GEMM operands).
ChunkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LossOptions:
    """Options of one loss call, passed to the autograd function / custom operator as one object.

    Attributes:
        weighting: TD and weighting options.
        ignore_index: Label value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        impl: Resolved backend, ``"torch"`` or ``"triton"``.
        chunk_rows: Rows per chunk, or ``None`` for the memory-budget default.
        grad_flags: Which differentiable inputs need a gradient, in the order of the Function's inputs.
        check_finite: Check the floating-point inputs for NaN / Inf (inside the operator).
    """

    weighting: WeightingOptions
    ignore_index: int
    reduction: str
    impl: str
    chunk_rows: int | None
    grad_flags: tuple[bool, ...]
    check_finite: bool = False

    def op_args(self) -> tuple:
        """The options as the scalar arguments of the custom operator (see :meth:`from_op_args`)."""
        w = self.weighting
        return (
            float(w.gamma),
            float(w.beta),
            float(w.min_weight),
            float(w.max_weight),
            w.terminal,
            int(self.ignore_index),
            self.reduction,
            self.impl,
            self.chunk_rows or 0,
            list(self.grad_flags),
            bool(self.check_finite),
        )

    @classmethod
    def from_op_args(cls, *args) -> LossOptions:
        """Inverse of :meth:`op_args`."""
        ignore_index, reduction, impl, rows, flags, finite = args[5:]
        weighting = WeightingOptions(*args[:5])  # gamma, beta, min_weight, max_weight, terminal
        return cls(weighting, ignore_index, reduction, impl, rows or None, tuple(flags), finite)


def weighting_options(options: WeightingOptions | None, **scalars: float | str | None) -> WeightingOptions:
    """The weighting of one call: ``options``, or the scalar keywords (``None`` = the default).

    Args:
        options: A :class:`WeightingOptions`, or ``None``.
        **scalars: ``gamma``, ``beta``, ``min_weight``, ``max_weight``, ``terminal`` as passed.

    Returns:
        The options.

    Raises:
        ValueError: both ``options`` and a scalar keyword given, or invalid values.
        TypeError: ``options`` is not a :class:`WeightingOptions`.
    """
    given = {name: value for name, value in scalars.items() if value is not None}
    if options is None:
        return WeightingOptions(**given)
    if not isinstance(options, WeightingOptions):
        raise TypeError(f"options must be a WeightingOptions or None, got {type(options).__name__}")
    if given:
        raise ValueError(
            f"pass the weighting either as options=WeightingOptions(...) or as keywords, not both "
            f"(got options and {sorted(given)})"
        )
    return options


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """The backend for tensors on ``device``: ``impl``, or Triton on CUDA and torch elsewhere.

    Args:
        impl: ``"triton"``, ``"torch"`` or ``None`` (automatic).
        device: Device of the inputs.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: unknown ``impl``, or ``"triton"`` on a non-CUDA device without ``TRITON_INTERPRET=1``.
    """
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (inputs are on {device}); set TRITON_INTERPRET=1 before "
            "importing triton to run the Triton kernels on CPU, or use impl='torch'"
        )
    return impl


def triton_chunk_fn() -> ChunkFn:
    """The Triton chunk primitive, imported on first use (Triton is optional for the torch path).

    Returns:
        :func:`wmtp_kernels._triton_ce.weighted_ce_chunk_`.
    """
    try:
        from wmtp_kernels._triton_ce import weighted_ce_chunk_
    except ImportError as error:
        raise ImportError(
            f"impl='triton' needs the Triton kernels, which failed to import: {error}"
        ) from error
    return weighted_ce_chunk_


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise unless ``chunk_size`` is ``None`` or a positive int."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_same_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first given tensor that is not on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the loss inputs are on {device}")


@dataclass(frozen=True)
class RowWeights:
    """The weight source of the processed rows: explicit per-row weights or per-row TD inputs.

    Attributes:
        weights: ``[R]`` float32 weights of the processed rows (given or uniform), or ``None``.
        td: TD inputs of the processed rows, or ``None``.
    """

    weights: torch.Tensor | None
    td: TDRowInputs | None

    def chunk(self, rows: slice) -> tuple[torch.Tensor | None, TDRowInputs | None]:
        """``(weights, td)`` of a slice of the processed rows, ready for a chunk primitive."""
        if self.td is not None:
            return None, self.td.select(rows)
        return self.weights[rows], None


def row_weights(
    layout: RowLayout,
    rows: torch.Tensor,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    weighting: WeightingOptions,
    dtype: torch.dtype = torch.float32,
) -> RowWeights:
    """Per-row weight source for the given rows (uniform when neither weights nor values are given).

    Args:
        layout: The row layout.
        rows: ``[R]`` int64 indices of the rows to process.
        weights: ``[B, T]`` token weights or ``None``.
        values: ``[B, T(, 1)]`` critic values or ``None``.
        rewards: ``[B]`` rewards or ``None``.
        attention_mask: ``[B, T]`` mask or ``None``.
        weighting: TD and weighting options.
        dtype: Dtype of the per-row weights (see :func:`wmtp_kernels._rows.compute_dtype`).

    Returns:
        The :class:`RowWeights`.
    """
    if values is not None:
        td = td_row_inputs(layout, values, rewards, attention_mask, weighting, dtype)
        return RowWeights(None, td.select(rows))
    if weights is not None:
        return RowWeights(gather_row_weights(layout, weights, rows, dtype), None)
    return RowWeights(torch.ones(rows.numel(), dtype=dtype, device=rows.device), None)


def token_weight_grads(
    layout: RowLayout,
    rows: torch.Tensor,
    dloss_drow_weight: torch.Tensor,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    weighting: WeightingOptions,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients to ``weights`` / ``values`` / ``rewards`` from d(loss)/d(weight of each row).

    Rows sharing a token weight ``(b, j)`` are summed into a ``[B, T]`` gradient; for critic values it
    is chained through the TD errors and clipped weights by :func:`wmtp_kernels.td_weights.td_weight_grads`
    in the dtype of ``dloss_drow_weight``.

    Args:
        layout: The row layout.
        rows: ``[R]`` int64 processed rows.
        dloss_drow_weight: ``[R]`` d(loss)/d(row weight), e.g. ``scale * ce`` (float32 or float64).
        weights: ``[B, T]`` token weights or ``None``.
        values: Critic values or ``None``.
        rewards: Rewards or ``None``.
        attention_mask: ``[B, T]`` mask or ``None``.
        weighting: TD and weighting options.
        needs: Whether weights, values, rewards need a gradient.

    Returns:
        ``(d_weights, d_values, d_rewards)`` shaped and typed as the inputs, ``None`` where not needed.
    """
    if not any(needs):
        return None, None, None
    flat = layout.row_b[rows] * layout.seq + layout.row_j[rows]
    dtype = dloss_drow_weight.dtype
    per_token = torch.zeros(layout.batch * layout.seq, dtype=dtype, device=rows.device)
    per_token.index_add_(0, flat, dloss_drow_weight)
    per_token = per_token.view(layout.batch, layout.seq)
    if weights is not None:
        return per_token.to(weights.dtype), None, None
    d_values, d_rewards = td_weight_grads(per_token, values, rewards, attention_mask, weighting)
    d_values = d_values.to(values.dtype).reshape(values.shape) if needs[1] else None
    d_rewards = d_rewards.to(rewards.dtype) if needs[2] else None
    return None, d_values, d_rewards


def head_ce_sums(layout: RowLayout, rows: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """``[H]`` float64 sums of the unweighted cross-entropy of the valid rows of each head.

    Args:
        layout: The row layout.
        rows: ``[R]`` int64 processed rows.
        ce: ``[R]`` float32 cross-entropy (0 on invalid rows).

    Returns:
        ``[H]`` float64.
    """
    sums = torch.zeros(layout.heads, dtype=torch.float64, device=ce.device)
    return sums.index_add_(0, layout.head_of(rows), ce.double())
