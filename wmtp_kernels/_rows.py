"""Row layout of the H-offset loss, shared by the chunk primitives of every backend (kernel contract).

``hidden [B, T, H, d]`` (or ``logits [B, T, H, V]``) is viewed as ``N = B * T * H`` rows in the order
``r = (b * T + t) * H + (k - 1)``. Row ``(b, t, k)`` predicts ``labels[b, t + k]`` with the token weight
at index ``j = t + k - 1``, and counts only when it is *valid*: ``t + k < T``, both positions are real
and the label is not ``ignore_index`` (:func:`wmtp_kernels.masks.prediction_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from wmtp_kernels.masks import last_token_index, prediction_targets
from wmtp_kernels.options import WeightingOptions
from wmtp_kernels.td_weights import td_terms


@dataclass(frozen=True)
class TDRowInputs:
    """What a chunk kernel needs to compute each row's TD weight in-kernel.

    Row ``i`` of a chunk takes its weight from sequence ``row_b[i]`` at weight index ``row_j[i]``
    (``j = t + k - 1`` for head k at position t), with the TD error of
    :func:`wmtp_kernels.td_weights.td_terms` and the weight of
    :func:`wmtp_kernels.td_weights.build_weights`.

    Attributes:
        values: ``[B, T]`` float32 contiguous critic values (detached).
        rewards: ``[B]`` float32 sequence rewards.
        mask: ``[B, T]`` bool / int8 contiguous attention mask (nonzero = real token).
        last: ``[B]`` int64 index of the last real token of each sequence (``-1`` if none).
        row_b: ``[C]`` int64 batch index of each row.
        row_j: ``[C]`` int64 weight index of each row.
        gamma: TD discount.
        beta: Weight temperature (> 0).
        min_weight: Lower weight clip.
        max_weight: Upper weight clip.
        terminal: ``"last_state"`` or ``"last_transition"``.
    """

    values: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    row_b: torch.Tensor
    row_j: torch.Tensor
    gamma: float
    beta: float
    min_weight: float
    max_weight: float
    terminal: str

    def select(self, rows: torch.Tensor | slice) -> TDRowInputs:
        """The same inputs restricted to some rows (``row_b`` / ``row_j`` indexed by ``rows``).

        Args:
            rows: Row indices or a slice.

        Returns:
            A new :class:`TDRowInputs` sharing ``values``, ``rewards``, ``mask`` and ``last``.
        """
        return replace(self, row_b=self.row_b[rows], row_j=self.row_j[rows])


@dataclass(frozen=True)
class RowLayout:
    """Targets, validity and weight indices of all ``N = B * T * H`` rows.

    Attributes:
        batch: B.
        seq: T.
        heads: H.
        valid: ``[N]`` bool, the rows that count (``None`` where the Triton row kernels planned the call,
            :mod:`wmtp_kernels._triton_rows`, which hand over the valid rows' data directly).
        targets: ``[N]`` int64 target ids, 0 on invalid rows so every id is a legal index (``None`` as
            ``valid``).
        head_counts: ``[H]`` int64 number of valid rows of each head.
    """

    batch: int
    seq: int
    heads: int
    valid: torch.Tensor | None
    targets: torch.Tensor | None
    head_counts: torch.Tensor

    @property
    def n_rows(self) -> int:
        """``N = B * T * H``."""
        return self.batch * self.seq * self.heads

    @property
    def row_b(self) -> torch.Tensor:
        """``[N]`` int64 batch index of each row."""
        b = torch.arange(self.batch, device=self.head_counts.device)
        return b.repeat_interleave(self.seq * self.heads)

    @property
    def row_j(self) -> torch.Tensor:
        """``[N]`` int64 weight index ``t + k - 1``, clipped to ``T - 1`` (only invalid rows clip)."""
        device = self.head_counts.device
        t = torch.arange(self.seq, device=device)[:, None]
        k = torch.arange(1, self.heads + 1, device=device)[None, :]
        return (t + k - 1).clamp(max=self.seq - 1).reshape(-1).repeat(self.batch)

    def head_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Head index ``k - 1`` of the given rows."""
        return rows % self.heads

    def valid_rows(self, count: int | None = None) -> torch.Tensor:
        """``[N_valid]`` int64 ascending indices of the valid rows (the compaction used by chunking).

        Args:
            count: ``N_valid`` if the caller has read it (``valid.sum()``) already: then no further
                synchronisation with the device; else ``nonzero`` reads it.
        """
        if count is None:
            return self.valid.nonzero().squeeze(1)
        return torch.nonzero_static(self.valid, size=count).squeeze(1)


def build_row_layout(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, heads: int, ignore_index: int
) -> RowLayout:
    """Row layout of an ``[B, T]`` batch for ``heads`` future-token heads.

    Args:
        labels: ``[B, T]`` int token ids (ids out of range only pass through to ``targets``).
        attention_mask: ``[B, T]`` mask or ``None`` (all real).
        heads: H.
        ignore_index: Label value excluded from the loss.

    Returns:
        The :class:`RowLayout`.
    """
    batch, seq = labels.shape
    valid, target_ids = prediction_targets(labels, attention_mask, heads, ignore_index)
    targets = torch.where(valid, target_ids.long(), 0)
    return RowLayout(
        batch=batch,
        seq=seq,
        heads=heads,
        valid=valid.reshape(-1),
        targets=targets.reshape(-1),
        head_counts=valid.sum(dim=(0, 1)),
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-row quantities (CE, weights, scales): float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_scale(
    layout: RowLayout,
    reduction: str,
    dtype: torch.dtype = torch.float32,
    target_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss scale: ``valid / (H * max(count_k, 1))`` for ``mean``, ``valid`` otherwise.

    Args:
        layout: The row layout.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``none`` uses unit scales; the caller multiplies
            by the incoming per-row gradient).
        dtype: Result dtype.
        target_counts: ``[H]`` counts ``count_k`` that ``mean`` divides by (e.g. of a whole accumulated
            batch), or ``None`` for this batch's own ``layout.head_counts``.

    Returns:
        ``[N]`` scales, zero on invalid rows.
    """
    scale = layout.valid.to(dtype)
    if reduction == "mean":
        counts = layout.head_counts if target_counts is None else target_counts
        per_head = 1.0 / (layout.heads * counts.to(dtype).clamp(min=1))
        scale = scale * per_head.repeat(layout.batch * layout.seq)
    return scale


def gather_row_weights(
    layout: RowLayout, token_weights: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The token weight ``weights[b, t + k - 1]`` of each of the given rows.

    Args:
        layout: The row layout.
        token_weights: ``[B, T]`` weights.
        rows: ``[C]`` int64 row indices.
        dtype: Result dtype.

    Returns:
        ``[C]`` weights.
    """
    flat = layout.row_b[rows] * layout.seq + layout.row_j[rows]
    return token_weights.detach().reshape(-1).to(dtype)[flat]


def td_row_inputs(
    layout: RowLayout,
    values: torch.Tensor,
    rewards: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: WeightingOptions,
    dtype: torch.dtype = torch.float32,
    row_b_j: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TDRowInputs:
    """The :class:`TDRowInputs` of all ``N`` rows, or of the rows whose ``row_b`` / ``row_j`` are given
    (select a chunk with :meth:`TDRowInputs.select`).

    Args:
        layout: The row layout.
        values: ``[B, T]`` or ``[B, T, 1]`` critic values (detached and cast to ``dtype`` here).
        rewards: ``[B]`` rewards.
        attention_mask: ``[B, T]`` mask or ``None``.
        options: TD and weighting options.
        dtype: Dtype of values and rewards: float32 (the kernel contract) or float64 (torch backend).
        row_b_j: ``(row_b, row_j)`` of the rows, or ``None`` for all of the layout's.

    Returns:
        The TD inputs.
    """
    row_b, row_j = (layout.row_b, layout.row_j) if row_b_j is None else row_b_j
    v = values.detach().reshape(layout.batch, layout.seq).to(dtype).contiguous()
    if attention_mask is None:
        mask = torch.ones(layout.batch, layout.seq, dtype=torch.bool, device=v.device)
    else:
        mask = attention_mask.bool().contiguous()
    return TDRowInputs(
        values=v,
        rewards=rewards.detach().to(dtype).contiguous(),
        mask=mask,
        last=last_token_index(mask),
        row_b=row_b,
        row_j=row_j,
        gamma=float(options.gamma),
        beta=float(options.beta),
        min_weight=float(options.min_weight),
        max_weight=float(options.max_weight),
        terminal=options.terminal,
    )


def td_row_weights(td: TDRowInputs) -> torch.Tensor:
    """Per-row weights from :class:`TDRowInputs`, by the contract's per-row formula (torch backend).

    Args:
        td: TD inputs of ``C`` rows.

    Returns:
        ``[C]`` ``clamp(exp(td(b, j) / beta), min_weight, max_weight)`` in the dtype of ``td.values``.
    """
    real = td.mask.bool()
    terms = td_terms(td.values, td.rewards, real, td.last, td.row_b, td.row_j, td.gamma, td.terminal)
    return torch.clamp(torch.exp(terms.td / td.beta), min=td.min_weight, max=td.max_weight)
