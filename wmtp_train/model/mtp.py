"""Meta's multi-token-prediction (MTP) Llama with a value head, in plain trainable PyTorch.

Layout (parameter names match Meta's consolidated checkpoints, see :mod:`wmtp_train.model.meta_checkpoint`):

- ``tok_embeddings``: token embedding.
- ``layers``: ``n_layers - n_future_tokens + 1`` Llama blocks. ``layers[:-1]`` is the shared trunk,
  ``layers[-1]`` the head block of the next-token head (head 1).
- ``extra_heads``: ``n_future_tokens - 1`` blocks, the heads 2..H. Every head block reads the trunk
  output independently (the heads are parallel, not stacked).
- ``head``: :class:`MTPOutputHead`, holding the shared final ``norm`` and the shared unembedding
  ``output`` (not tied to the embedding). The weighted loss is computed inside its ``forward`` so that
  FSDP2 all-gathers ``norm`` / ``output`` around that call and the loss never sees a sharded DTensor.
- ``value_head``: :class:`ValueHead` on the trunk output, V(s_t) ≈ P(success | x_<=t).

Head k (1..H) at position t predicts token t+k.

Padding (see :mod:`wmtp_train.model.layers`): a sequence gives the same hidden states and values on its
real tokens whether it is left- or right-padded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from wmtp_kernels import IGNORE_INDEX, WeightingOptions, fused_weighted_mtp_loss
from wmtp_train.model.args import ModelArgs, resolve_args
from wmtp_train.model.layers import (
    RMSNorm,
    Rotary,
    TransformerBlock,
    attention_bias,
    positions_from_mask,
    rotary_tables,
)
from wmtp_train.model.value_head import ValueHead

LOSS_IMPLEMENTATIONS = ("fused", "reference")


@dataclass(frozen=True)
class LossOptions:
    """Options of the weighted MTP loss, forwarded to ``wmtp_kernels.fused_weighted_mtp_loss``."""

    weighting: WeightingOptions = WeightingOptions()
    """How TD weights are built from values and rewards (used when the forward pass gets ``rewards``)."""
    ignore_index: int = IGNORE_INDEX
    """Label value excluded from the loss (prompt tokens)."""
    reduction: str = "mean"
    """``"mean"``, ``"sum"`` or ``"none"``."""
    return_stats: bool = False
    """Also return per-head CE and TD / weight statistics."""
    check_finite: bool = False
    """Raise ``ValueError`` naming the tensor when the hidden states or values hold NaN / Inf."""
    implementation: str = "fused"
    """``"fused"`` (``wmtp_kernels.fused_weighted_mtp_loss``) or ``"reference"`` (the plain PyTorch
    oracle ``wmtp_kernels.reference.weighted_mtp_loss_from_hidden``, same signature; for A/B comparisons)."""

    def __post_init__(self) -> None:
        if not isinstance(self.weighting, WeightingOptions):
            raise TypeError(
                f"LossOptions.weighting must be a WeightingOptions, got {type(self.weighting).__name__}"
            )
        if self.implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(
                f"LossOptions.implementation must be one of {LOSS_IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        if self.check_finite and self.implementation != "fused":
            raise ValueError("LossOptions: check_finite needs implementation='fused'")

    def loss_function(self) -> Callable[..., Any]:
        """The loss function this implementation names (both take the same arguments)."""
        if self.implementation == "fused":
            return functools.partial(fused_weighted_mtp_loss, check_finite=self.check_finite)
        # The deliberate A/B switch: the oracle itself, never on the default path.
        from wmtp_kernels.reference import weighted_mtp_loss_from_hidden

        return weighted_mtp_loss_from_hidden


class TrunkOutput(NamedTuple):
    """Result of :meth:`MTPTransformer.trunk_forward`."""

    hidden: torch.Tensor
    """[B, T, d] raw trunk output (before any head block or norm)."""
    values: torch.Tensor
    """[B, T, 1] value estimates V(s_t)."""


@dataclass
class ModelOutput:
    """Result of :meth:`MTPTransformer.full_forward` and :meth:`MTPTransformer.forward`."""

    values: torch.Tensor
    """[B, T, 1] value estimates V(s_t)."""
    trunk: torch.Tensor
    """[B, T, d] raw trunk states (the value head's input; e.g. for a lagged copy of the value head)."""
    hidden: torch.Tensor | None = None
    """[B, T, H, d] final-normed hidden states of the heads."""
    logits: torch.Tensor | None = None
    """[B, T, H, V] float32 logits, only when asked for."""
    loss: torch.Tensor | None = None
    """Weighted MTP loss (scalar, or [B, T, H] with ``reduction="none"``)."""
    stats: dict[str, Any] | None = None
    """Statistics from the loss kernel when ``LossOptions.return_stats``."""


class HeadOutput(NamedTuple):
    """Result of :meth:`MTPOutputHead.forward`."""

    hidden: torch.Tensor
    """[B, T, H, d] final-normed head states."""
    logits: torch.Tensor | None
    """[B, T, H, V] float32 logits when asked for."""
    loss: torch.Tensor | None
    """The loss when labels were given."""
    stats: dict[str, Any] | None
    """Loss statistics when asked for."""


class MTPOutputHead(nn.Module):
    """Shared final norm + unembedding of the H heads, and the weighted MTP loss on them.

    Everything that reads ``norm`` or ``output`` happens in :meth:`forward`, so that FSDP2 (which
    all-gathers a module's parameters around its ``forward``) hands the loss kernel full tensors.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(
        self,
        head_hidden_raw: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        loss_options: LossOptions | None = None,
        return_logits: bool = False,
    ) -> HeadOutput:
        """Normalise the head states and compute the loss (when ``labels``) and/or logits.

        Args:
            head_hidden_raw: [B, T, H, d] outputs of the head blocks.
            labels: [B, T] int64 targets (the input ids, prompt tokens set to ``ignore_index``);
                None skips the loss.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            weights: [B, T] per-token weights; the prediction of x_{t+k} uses weights[t+k-1]
                (docs/DESIGN.md, "H-offset alignment").
            values: [B, T, 1] or [B, T] critic values, with ``rewards`` [B]: TD weights built in-kernel.
            rewards: [B] sequence rewards.
            loss_options: loss options (defaults: :class:`LossOptions`).
            return_logits: also return [B, T, H, V] float32 logits (materialised; for evaluation).

        Returns:
            :class:`HeadOutput`.
        """
        if head_hidden_raw.dim() != 4:
            raise ValueError(
                f"head_hidden_raw must be [B, T, H, d], got shape {tuple(head_hidden_raw.shape)}"
            )
        normed = self.norm(head_hidden_raw)
        logits = self.output(normed).float() if return_logits else None
        loss = stats = None
        if labels is not None:
            options = loss_options if loss_options is not None else LossOptions()
            if values is not None and values.dim() == 3:
                values = values.squeeze(-1)
            result = options.loss_function()(
                normed,
                self.output.weight,
                labels,
                attention_mask,
                weights=weights,
                values=values,
                rewards=rewards,
                **dataclasses.asdict(options.weighting),
                ignore_index=options.ignore_index,
                reduction=options.reduction,
                return_stats=options.return_stats,
            )
            loss, stats = result if options.return_stats else (result, None)
        return HeadOutput(normed, logits, loss, stats)

    def init_weights(self) -> None:
        """Unit norm gain; unembedding ~ N(0, 1/d) truncated at 3 sigma."""
        self.norm.reset_parameters()
        std = self.output.in_features**-0.5
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)


class MTPTransformer(nn.Module):
    """Meta's MTP Llama (shared trunk, H parallel head blocks, shared norm + unembedding) + value head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_future_tokens = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_trunk_layers + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_future_tokens - 1))
        self.head = MTPOutputHead(args)
        self.value_head = ValueHead(args)

    @property
    def head_blocks(self) -> list[TransformerBlock]:
        """The H head blocks in head order: head 1 is ``layers[-1]``, heads 2..H ``extra_heads``."""
        return [self.layers[-1], *self.extra_heads]

    def init_weights(self) -> None:
        """Initialise every parameter (call after ``to_empty`` on a meta-built model).

        The model keeps no buffers (RoPE tables are computed per forward), so nothing else needs
        restoring after ``to_empty``.
        """
        std = 0.02
        # Residual-writing projections scaled by the depth of the deepest path (trunk + one head).
        out_std = std / math.sqrt(2 * (self.args.n_trunk_layers + 1))
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for block in [*self.layers, *self.extra_heads]:
            block.init_weights(std, out_std)
        self.head.init_weights()
        self.value_head.init_weights()

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.shape[1] > self.args.max_seq_len:
            raise ValueError(
                f"input_ids has T={input_ids.shape[1]} tokens, more than max_seq_len={self.args.max_seq_len}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} "
                f"!= input_ids shape {tuple(input_ids.shape)}"
            )

    def _run_trunk(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Rotary, torch.Tensor | None]:
        self._check_inputs(input_ids, attention_mask)
        if attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            mask = None
        else:
            positions = positions_from_mask(attention_mask)
            mask = attention_bias(attention_mask)
        rotary = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(input_ids)
        for block in self.layers[:-1]:
            h = block(h, rotary, mask)
        return h, rotary, mask

    def _run_heads(
        self, trunk: torch.Tensor, rotary: Rotary, mask: torch.Tensor | None, n_heads: int
    ) -> torch.Tensor:
        return torch.stack([block(trunk, rotary, mask) for block in self.head_blocks[:n_heads]], dim=2)

    def trunk_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
    ) -> TrunkOutput:
        """Trunk states and values, no head blocks, no vocabulary projection.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            value_mask: [B, T], 1 at the completion tokens, whose hazards the ``"hazard"`` value head
                accumulates (None: ``attention_mask``); the other value heads ignore it.

        Returns:
            :class:`TrunkOutput` with ``hidden`` [B, T, d] (raw) and ``values`` [B, T, 1].
        """
        return self._trunk_and_values(input_ids, attention_mask, value_mask)

    def _trunk_and_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, value_mask: torch.Tensor | None
    ) -> TrunkOutput:
        hidden, _, _ = self._run_trunk(input_ids, attention_mask)
        return TrunkOutput(hidden, self._values(hidden, attention_mask, value_mask))

    def _values(
        self, trunk: torch.Tensor, attention_mask: torch.Tensor | None, value_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.value_head(trunk, attention_mask if value_mask is None else value_mask)

    def full_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        n_heads: int | None = None,
        value_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """All heads: normed head states, values, and logits when asked.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            return_logits: also compute [B, T, H, V] float32 logits.
            n_heads: run only the first ``n_heads`` heads (e.g. 1 for next-token generation);
                None runs all H.
            value_mask: as in :meth:`trunk_forward`.

        Returns:
            :class:`ModelOutput` with ``hidden`` [B, T, H', d], ``values`` [B, T, 1], ``logits``.
        """
        n_heads = self.n_future_tokens if n_heads is None else n_heads
        if not 1 <= n_heads <= self.n_future_tokens:
            raise ValueError(f"n_heads must be in [1, {self.n_future_tokens}], got {n_heads}")
        trunk, rotary, mask = self._run_trunk(input_ids, attention_mask)
        values = self._values(trunk, attention_mask, value_mask)
        head_out = self.head(self._run_heads(trunk, rotary, mask, n_heads), return_logits=return_logits)
        return ModelOutput(values=values, trunk=trunk, hidden=head_out.hidden, logits=head_out.logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        loss_options: LossOptions | None = None,
        trunk_only: bool = False,
        value_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """One training pass: trunk -> values -> head blocks -> weighted MTP loss.

        Token weights come from exactly one source: ``weights`` (e.g. Rho-1), or ``rewards``, in which
        case the kernel builds TD weights from the detached values (AWR / IQL: the policy loss does not
        train the critic), or neither, for uniform weights (the baseline).

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for real tokens (None: all real).
            labels: [B, T] targets, prompt tokens set to ``ignore_index``; None uses ``input_ids``.
            weights: [B, T] per-token weights.
            rewards: [B] sequence rewards (TD weights from ``values.detach()``).
            loss_options: loss options (defaults: :class:`LossOptions`).
            trunk_only: stop after the value head (stage 1's pass: no head block, no loss; ``labels``,
                ``weights``, ``rewards`` and ``loss_options`` are ignored). The training stages call the
                model this way rather than through :meth:`trunk_forward` so that every training step
                enters the root module through ``__call__``, where module hooks (FSDP2's, memory
                tracking's) see it.
            value_mask: as in :meth:`trunk_forward` (the trainer passes its completion mask).

        Returns:
            :class:`ModelOutput` with ``loss``, ``values`` [B, T, 1] (with grad, for the value loss),
            ``trunk`` [B, T, d], ``hidden`` [B, T, H, d] and ``stats`` when asked; ``values`` and
            ``trunk`` only with ``trunk_only``.
        """
        if trunk_only:
            trunk, values = self._trunk_and_values(input_ids, attention_mask, value_mask)
            return ModelOutput(values=values, trunk=trunk)
        if weights is not None and rewards is not None:
            raise ValueError("pass either weights or rewards, not both")
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        trunk, rotary, mask = self._run_trunk(input_ids, attention_mask)
        values = self._values(trunk, attention_mask, value_mask)
        td_values = None
        if rewards is not None:
            td_values = values.detach()
        elif weights is None:
            weights = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        head_out = self.head(
            self._run_heads(trunk, rotary, mask, self.n_future_tokens),
            labels,
            attention_mask,
            weights=weights,
            values=td_values,
            rewards=rewards,
            loss_options=loss_options,
        )
        return ModelOutput(
            values=values, trunk=trunk, hidden=head_out.hidden, loss=head_out.loss, stats=head_out.stats
        )


def build_model(
    args_or_preset: ModelArgs | str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MTPTransformer:
    """Build a model; initialised unless built on the meta device.

    On ``device="meta"`` no memory is allocated: shard it, then ``to_empty(device=...)`` and
    ``init_weights()``.

    Args:
        args_or_preset: model arguments or a preset name.
        device: where to allocate (default: the current default device).
        dtype: parameter dtype (default: the current default dtype).

    Returns:
        The model.
    """
    args = resolve_args(args_or_preset)
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = MTPTransformer(args)
    if dtype is not None:
        model = model.to(dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
