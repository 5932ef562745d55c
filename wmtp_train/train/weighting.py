"""Token-weighting recipes of stage 2: which records are trained, and how each token's loss is weighted.

A recipe is a :class:`TokenWeighting` subclass whose ``name`` is a value of ``stage2.weighting``; defining
the class registers it. Adding a recipe means adding a class here and a TOML in ``wmtp_train/recipes/``.

Index convention (docs/DESIGN.md, "Weights"): ``weights[b, j]`` weighs every head's prediction of token
``j + 1``; head k predicts token ``j + 1`` from position ``j + 1 - k``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wmtp_kernels import IGNORE_INDEX, applied_weight_mask, prediction_targets
from wmtp_train.model import LossOptions, MTPTransformer

if TYPE_CHECKING:
    from wmtp_train.config import TrainConfig
    from wmtp_train.data.index import OffsetIndex
    from wmtp_train.train.model_builder import ModelBuilder

WEIGHTINGS: dict[str, type[TokenWeighting]] = {}
"""Every recipe class by name (filled as the classes are defined)."""


class TokenWeighting:
    """How stage 2 weights tokens: the records it trains on and the token-weight source of the loss.

    Args:
        config: the run's configuration.
        builder: builds extra models a recipe needs (e.g. Rho-1's frozen reference).
    """

    name: ClassVar[str]
    """The ``stage2.weighting`` value that selects this recipe."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name in WEIGHTINGS:
            raise ValueError(f"token weighting {cls.name!r} is defined twice")
        WEIGHTINGS[cls.name] = cls

    def __init__(self, config: TrainConfig, builder: ModelBuilder):
        self.config = config

    @classmethod
    def records(cls, index: OffsetIndex) -> np.ndarray | None:
        """The dataset records stage 2 samples from (a class method: it depends on the labels alone).

        Args:
            index: the training set's offset index (labels and difficulties of every record).

        Returns:
            Record indices, or None for all records.
        """
        return None

    def loss_inputs(self, model: MTPTransformer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The token-weight arguments of the model's forward for one micro-batch.

        Args:
            model: the model being trained.
            batch: the collated micro-batch on the training device.

        Returns:
            ``{"weights": [B, T]}``, ``{"rewards": [B]}`` (TD weights from the detached critic, built in
            the loss kernel with ``config.td``), or ``{}`` for uniform weights.
        """
        return {}


class UniformWeighting(TokenWeighting):
    """Every trained token weighs 1: plain multi-token prediction (the baseline)."""

    name = "uniform"


class CorrectOnlyWeighting(UniformWeighting):
    """Filtered fine-tuning: uniform weights on the records whose tests pass, and only those are sampled,
    so the whole token budget goes to correct code (incorrect records are not zero-weighted rows)."""

    name = "correct_only"

    @classmethod
    def records(cls, index: OffsetIndex) -> np.ndarray:
        """The indices of the correct records (an error when there is none)."""
        correct = np.flatnonzero(index.is_correct)
        if len(correct) == 0:
            raise ValueError(f"stage2.weighting = {cls.name!r}: the training data has no correct record")
        return correct


class TDWeighting(TokenWeighting):
    """TD-error weights ``clamp(exp(td / beta), min_weight, max_weight)`` from the detached critic and the
    record's verified reward, built inside the loss kernel (options: ``config.td``)."""

    name = "td"

    def loss_inputs(self, model: MTPTransformer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"rewards": batch["rewards"]}``: the model passes its detached values with them."""
        return {"rewards": batch["rewards"]}


class Rho1Weighting(TokenWeighting):
    """Rho-1 selection: the ``rho1.top_k`` fraction of the micro-batch's trained tokens with the highest
    excess loss (current CE minus a frozen reference model's) weigh 1, the others
    ``rho1.unselected_weight``, normalised to mean 1 over the trained tokens.

    The reference is ``rho1.reference_checkpoint``, else the run's initial weights.
    """

    name = "rho1"

    def __init__(self, config: TrainConfig, builder: ModelBuilder):
        super().__init__(config, builder)
        self.reference = builder.build(
            config.rho1.reference_checkpoint or config.model.checkpoint_dir, adapted=False
        )
        self.reference.requires_grad_(False)

    def loss_inputs(self, model: MTPTransformer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"weights": ...}`` from two no-grad forward passes (the model and the reference)."""
        per_position = LossOptions(reduction="none")
        ones = torch.ones(batch["input_ids"].shape, dtype=torch.float32, device=batch["input_ids"].device)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            ce_model = model(*args, weights=ones, loss_options=per_position).loss
            ce_reference = self.reference(*args, weights=ones, loss_options=per_position).loss
        cfg = self.config.rho1
        scores = excess_loss_scores(
            ce_model, ce_reference, batch["labels"], batch["attention_mask"], cfg.score
        )
        weights = rho1_weights(
            scores, batch["labels"], batch["attention_mask"], cfg.top_k, cfg.unselected_weight
        )
        return {"weights": weights}


def excess_loss_scores(
    ce_model: torch.Tensor,
    ce_reference: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    score: str = "mean_heads",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Rho-1 excess loss per weight index j (the token j + 1): current CE minus reference CE.

    ``mean_heads``: the mean over the heads k whose prediction of token j + 1 (made at position
    j + 1 - k) is valid; ``next_token``: head 1's alone (position j).

    Args:
        ce_model: [B, T, H] per-position per-head CE of the trained model (``reduction="none"``).
        ce_reference: the same for the reference model.
        labels: [B, T] targets.
        attention_mask: [B, T].
        score: ``mean_heads`` or ``next_token``.
        ignore_index: ignored label value.

    Returns:
        [B, T] float32 scores (0 where no head has a valid prediction of token j + 1).
    """
    if ce_model.shape != ce_reference.shape or ce_model.dim() != 3:
        raise ValueError(
            f"ce_model {tuple(ce_model.shape)} and ce_reference {tuple(ce_reference.shape)} "
            "must be equal [B, T, H]"
        )
    batch, seq, heads = ce_model.shape
    diff = (ce_model - ce_reference).float()
    total = diff.new_zeros(batch, seq)
    count = diff.new_zeros(batch, seq)
    scored_heads = 1 if score == "next_token" else heads
    valid_rows, _ = prediction_targets(labels, attention_mask, scored_heads, ignore_index)
    for k in range(1, scored_heads + 1):
        if seq - k <= 0:
            continue
        valid = valid_rows[:, : seq - k, k - 1].float()
        # Prediction at position t (< T - k) is of token t + k, i.e. weight index t + k - 1.
        total += F.pad(diff[:, : seq - k, k - 1] * valid, (k - 1, 1))
        count += F.pad(valid, (k - 1, 1))
    return total / count.clamp(min=1)


def rho1_weights(
    scores: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    top_k: float,
    unselected_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Top-k% selection over the trained tokens of a batch, normalised to mean 1 over them.

    The tokens with the highest excess loss get weight 1, the others ``unselected_weight`` (0: Rho-1's
    hard selection); then all weights are divided by their mean over the trained tokens, so the loss is
    the mean CE over the selected tokens (Rho-1's normalisation) rather than shrinking with ``top_k``.

    Args:
        scores: [B, T] from :func:`excess_loss_scores`.
        labels: [B, T] targets.
        attention_mask: [B, T].
        top_k: fraction selected, in (0, 1].
        unselected_weight: weight of the rest before normalisation, in [0, 1].
        ignore_index: ignored label value.

    Returns:
        [B, T] float32 weights (1 where no prediction uses them).
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k must be in (0, 1], got {top_k}")
    applied = applied_weight_mask(labels, attention_mask, ignore_index)
    weights = torch.ones_like(scores, dtype=torch.float32)
    n = int(applied.sum())
    if n == 0:
        return weights
    n_keep = max(1, math.ceil(top_k * n))
    candidate = scores.float().masked_fill(~applied, float("-inf")).flatten()
    keep = torch.zeros_like(candidate, dtype=torch.bool)
    keep[torch.topk(candidate, n_keep, sorted=False).indices] = True
    keep = keep.view_as(scores)
    chosen = torch.where(keep, 1.0, unselected_weight)
    mean = chosen[applied].mean()
    return torch.where(applied, chosen / mean, weights)
