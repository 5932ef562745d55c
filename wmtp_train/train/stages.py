"""The trainer's stages (docs/DESIGN.md, "Trainer stages"): stage 1 pre-trains the critic on the trunk,
stage 2 trains the weighted multi-token loss (plus the clipped value loss).

A stage owns its trained parameters, optimizer, LR schedule and sampler. :meth:`Stage.step` is one
optimizer step on micro-batches it is handed (no data loading, no logging, no checkpointing), so the
same step runs in the trainer's loop, in a benchmark, or on fake tensors.

Loss normalisation across gradient accumulation and data-parallel ranks: each step first counts, over
all its micro-batches, the valid (head, position) predictions N (summed over the H heads) and the trained
value tokens M on every rank, and all-reduces both. A micro-batch's MTP term is
``sum_of_weighted_CE / N_global`` and its value term ``sum_of_value_loss / M_global``, each multiplied by
the world size because FSDP2 averages gradients over ranks. So the step's gradient is that of the global
token-mean loss, whatever the split into ranks and micro-batches: every token counts the same, whichever
rank saw it (a per-rank mean would over-weight the tokens of ranks that drew short sequences). With equal
valid counts per head (prompts of at least H tokens) ``sum / N`` equals the mean over heads of per-head
means (docs/DESIGN.md, "Normalisation and masking").

V_old for stage 2's clipped value loss: a frozen copy of the value head, refreshed every
``stage2.value_snapshot_every`` steps, applied to the detached trunk states the model returns for the
current forward pass. Clipping then bounds how far V may move from the lagged critic within one snapshot
period. The copy is saved in checkpoints so resume is exact.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from wmtp_kernels import value_loss
from wmtp_train.config import Stage1Config, Stage2Config, TrainConfig
from wmtp_train.data.index import OffsetIndex
from wmtp_train.data.samplers import BalancedSampler, CurriculumSampler
from wmtp_train.eval.metrics import explained_variance_from_moments
from wmtp_train.model import LossOptions, ModelArgs, MTPTransformer, ValueHead
from wmtp_train.train.checkpoint import ModelOptimizerState
from wmtp_train.train.lr_schedule import warmup_cosine
from wmtp_train.train.metrics import ReducedStep, RunningExplainedVariance, StepStats, prediction_counts
from wmtp_train.train.parallelize import DistInfo, all_reduce, full_tensor
from wmtp_train.train.weighting import TokenWeighting


class NonFiniteAbort(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclasses.dataclass
class TrainerState:
    """Counters that must survive a restart (saved as the checkpoint's ``trainer`` entry)."""

    step: int = 0
    """Global optimizer steps done (stage 1 + stage 2)."""
    stage: str = "stage1"
    """Current stage: ``stage1`` or ``stage2``."""
    stage_step: int = 0
    """Optimizer steps done in the current stage."""
    consecutive_skips: int = 0
    """Non-finite steps in a row."""
    skipped_steps: int = 0
    """Non-finite steps in total."""
    tokens: int = 0
    """Real tokens processed (all ranks)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


@dataclasses.dataclass
class StageContext:
    """What the stages share with the run."""

    config: TrainConfig
    model: MTPTransformer
    args: ModelArgs
    info: DistInfo
    state: TrainerState

    def print(self, text: str) -> None:
        """Print on rank 0 (flushed)."""
        if self.info.is_main:
            print(text, flush=True)


class Counts(NamedTuple):
    """A step's token counts over all its micro-batches and all ranks."""

    predictions: float
    """Valid (head, position) predictions, summed over the heads: the MTP loss normaliser."""
    value_tokens: float
    """Completion tokens: the value loss normaliser."""
    tokens: float
    """Real tokens."""


class StepResult(NamedTuple):
    """What one optimizer step reports."""

    metrics: dict[str, float]
    """The step's metrics (:mod:`wmtp_train.train.metrics`)."""
    tokens: int
    """Real tokens of the step on all ranks."""


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) with weight decay on matrices only (not on norms, biases or vectors)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Stage(ABC):
    """One training stage: its parameters, its sampler, and the loss of a micro-batch.

    Args:
        ctx: the run's model, configuration and counters.
    """

    name: ClassVar[str]
    """``stage1`` or ``stage2`` (the checkpoint manifest's ``stage``)."""
    loss_key: ClassVar[str]
    """The metric whose finiteness decides whether the step is applied."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.sampler: BalancedSampler | CurriculumSampler | None = None
        self.records: np.ndarray | None = None
        """Dataset indices the sampler's positions map to (None: the whole dataset)."""
        self.running_ev = RunningExplainedVariance()

    # ---------------------------------------------------------------- what subclasses define
    @property
    @abstractmethod
    def settings(self) -> Stage1Config | Stage2Config:
        """This stage's section of the configuration."""

    @property
    @abstractmethod
    def trains_critic(self) -> bool:
        """Whether the value head learns in this stage (its explained variance is then reported)."""

    @abstractmethod
    def select_parameters(self) -> None:
        """Set ``requires_grad`` on the parameters this stage trains, and only on those."""

    @abstractmethod
    def make_sampler(self, index: OffsetIndex) -> BalancedSampler | CurriculumSampler:
        """The stage's sampler over ``index`` (or over :attr:`records` of it)."""

    @abstractmethod
    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """float64 [3] CPU: this micro-batch's predictions, value tokens and tokens (see :class:`Counts`)."""

    @abstractmethod
    def micro_batch_loss(self, batch: dict[str, Any], counts: Counts, stats: StepStats) -> torch.Tensor:
        """The micro-batch's share of the step's loss (already divided by the global counts); adds its
        statistics to ``stats``."""

    @abstractmethod
    def metrics(self, reduced: ReducedStep) -> dict[str, float]:
        """The step's loss metrics from the reduced statistics."""

    # ---------------------------------------------------------------- shared machinery
    @property
    def steps(self) -> int:
        """Optimizer steps of the stage."""
        return self.settings.steps

    def setup(self, index: OffsetIndex) -> None:
        """Select the trained parameters; make the optimizer, the LR schedule and the sampler.

        Args:
            index: the training set's offset index.
        """
        cfg = self.settings
        self.select_parameters()
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg.lr, cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        self.sampler = self.make_sampler(index)

    def checkpoint_state(self) -> dict[str, Any]:
        """The stage's checkpoint entries (DCP ``Stateful`` objects, restored in place)."""
        return {
            "app": ModelOptimizerState(self.ctx.model, self.optimizer),
            "lr_scheduler": self.scheduler,
            "sampler": self.sampler,
            "running_ev": self.running_ev,
        }

    def next_indices(self) -> list[list[int]]:
        """Dataset indices of this rank's micro-batches for the next step (advances the sampler)."""
        cfg = self.settings
        positions = iter(self.sampler)
        picked = [[next(positions) for _ in range(cfg.micro_batch_size)] for _ in range(cfg.grad_accum)]
        if self.records is None:
            return picked
        return [[int(self.records[i]) for i in batch] for batch in picked]

    def step(self, batches: list[dict[str, Any]]) -> StepResult:
        """One optimizer step on this rank's micro-batches (collective: every rank calls it together).

        Args:
            batches: collated micro-batches on the training device.

        Returns:
            The step's metrics and token count.
        """
        device, world = self.ctx.info.device, self.ctx.info.world_size
        local = torch.stack([self.counts(batch) for batch in batches]).sum(0)
        counts = Counts(*all_reduce(local, device).tolist())
        stats = StepStats()
        for batch in batches:
            loss = self._poison(self.micro_batch_loss(batch, counts, stats))
            stats.add(**{self.loss_key: loss.detach()})
            (loss * world).backward()
        reduced = stats.reduce(device)
        grad_norm, applied = self._apply_update(math.isfinite(reduced.sums[self.loss_key]))
        metrics = self.metrics(reduced)
        if self.trains_critic:
            moments = reduced.explained_variance_moments
            metrics["explained_variance"] = explained_variance_from_moments(moments)
            metrics["explained_variance_ema"] = self.running_ev.update(moments)
        metrics |= {"grad_norm": grad_norm, "step_skipped": float(not applied)}
        return StepResult(metrics, int(counts.tokens))

    def _poison(self, loss: torch.Tensor) -> torch.Tensor:
        """Debug: a NaN loss at the configured global steps (``numerics.inject_nan_steps``)."""
        if self.ctx.state.step + 1 in self.ctx.config.numerics.nan_steps():
            return loss * float("nan")
        return loss

    def _apply_update(self, loss_finite: bool) -> tuple[float, bool]:
        """Clip, then step the optimizer unless the loss or the gradient norm is non-finite.

        A skipped step leaves the parameters and the optimizer state untouched but still advances the LR
        schedule; ``numerics.max_consecutive_skips`` skips in a row raise :class:`NonFiniteAbort`.
        """
        state, max_norm = self.ctx.state, self.settings.max_grad_norm
        params = [p for p in self.ctx.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = float(full_tensor(norm))
        applied = loss_finite and math.isfinite(norm)
        if applied:
            self.optimizer.step()
            state.consecutive_skips = 0
        else:
            state.skipped_steps += 1
            state.consecutive_skips += 1
            self.ctx.print(
                f"step {state.step + 1}: non-finite loss or grad norm ({norm}); step skipped "
                f"({state.consecutive_skips} in a row, {state.skipped_steps} in total)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule (by design)
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if state.consecutive_skips >= self.ctx.config.numerics.max_consecutive_skips:
            raise NonFiniteAbort(
                f"{state.consecutive_skips} consecutive steps with a non-finite loss or gradient norm "
                f"(last at global step {state.step + 1}, {state.stage} step {state.stage_step + 1}, "
                f"lr {self.scheduler.get_last_lr()[0]:.3g}, grad norm {norm}); aborting. Lower the learning "
                "rate, check the data, or resume from an earlier checkpoint."
            )
        return norm, applied


class CriticStage(Stage):
    """Stage 1: regress the value head onto the reward over the completion tokens (``trunk_forward``:
    no head block, no unembedding), on a 50/50 correct / incorrect sampler. The trunk is frozen unless
    ``stage1.unfreeze_trunk``."""

    name = "stage1"
    loss_key = "value_loss"
    trains_critic = True

    @property
    def settings(self) -> Stage1Config:
        """``config.stage1``."""
        return self.ctx.config.stage1

    def select_parameters(self) -> None:
        """The value head; with ``unfreeze_trunk`` also the embedding and the trunk blocks."""
        model = self.ctx.model
        model.requires_grad_(False)
        model.value_head.requires_grad_(True)
        if self.settings.unfreeze_trunk:
            model.tok_embeddings.requires_grad_(True)
            for block in model.layers[:-1]:
                block.requires_grad_(True)

    def make_sampler(self, index: OffsetIndex) -> BalancedSampler:
        """A :class:`~wmtp_train.data.samplers.BalancedSampler` seeded with ``run.seed``."""
        info = self.ctx.info
        return BalancedSampler(
            index.is_correct,
            index.difficulty,
            seed=self.ctx.config.run.seed,
            rank=info.rank,
            world_size=info.world_size,
        )

    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """No predictions; the completion and real tokens."""
        value_tokens, tokens = batch["loss_mask"].sum(), batch["attention_mask"].sum()
        return torch.stack([torch.zeros_like(tokens), value_tokens, tokens]).double().cpu()

    def micro_batch_loss(self, batch: dict[str, Any], counts: Counts, stats: StepStats) -> torch.Tensor:
        """The value loss of the micro-batch's completion tokens over the step's value-token count."""
        cfg = self.settings
        out = self.ctx.model.trunk_forward(batch["input_ids"], batch["attention_mask"])
        loss = value_loss(
            out.values.float(),
            batch["rewards"],
            batch["loss_mask"],
            loss_type=cfg.value_loss,
            huber_delta=cfg.huber_delta,
        )
        stats.add_critic(out.values, batch["rewards"], batch["loss_mask"])
        return loss * batch["loss_mask"].sum() / max(counts.value_tokens, 1)

    def metrics(self, reduced: ReducedStep) -> dict[str, float]:
        """``value_loss``."""
        return {"value_loss": reduced.sums["value_loss"]}


class WeightedMTPStage(Stage):
    """Stage 2: the weighted MTP loss with the token weights of a :class:`TokenWeighting` recipe, plus
    ``value_coef`` times the clipped value loss, on the difficulty curriculum.

    Args:
        ctx: the run's model, configuration and counters.
        weighting: the token-weighting recipe.
    """

    name = "stage2"
    loss_key = "total_loss"

    def __init__(self, ctx: StageContext, weighting: TokenWeighting):
        super().__init__(ctx)
        self.weighting = weighting
        self.loss_options = LossOptions(
            ctx.config.td,
            reduction="sum",
            return_stats=True,
            implementation=self.settings.loss_impl,
            check_finite=ctx.config.numerics.check_finite,
        )
        self.value_snapshot: ValueHead | None = None

    @property
    def settings(self) -> Stage2Config:
        """``config.stage2``."""
        return self.ctx.config.stage2

    @property
    def trains_critic(self) -> bool:
        """When ``value_coef > 0``."""
        return self.settings.value_coef > 0

    def select_parameters(self) -> None:
        """Everything; the value head only when it is trained (``value_coef > 0``)."""
        self.ctx.model.requires_grad_(True)
        self.ctx.model.value_head.requires_grad_(self.trains_critic)

    def setup(self, index: OffsetIndex) -> None:
        """As :meth:`Stage.setup`, plus the value-head snapshot V_old."""
        super().setup(index)
        self.value_snapshot = ValueHead(self.ctx.args).to(self.ctx.info.device)
        self.value_snapshot.requires_grad_(False)
        self._refresh_snapshot()

    def checkpoint_state(self) -> dict[str, Any]:
        """As :meth:`Stage.checkpoint_state`, plus the value-head snapshot."""
        return {**super().checkpoint_state(), "value_snapshot": self.value_snapshot}

    def make_sampler(self, index: OffsetIndex) -> CurriculumSampler:
        """A :class:`~wmtp_train.data.samplers.CurriculumSampler` over the recipe's records."""
        cfg, info = self.settings, self.ctx.info
        self.records = self.weighting.records(index)
        difficulty = index.difficulty if self.records is None else index.difficulty[self.records]
        return CurriculumSampler(
            difficulty,
            total_steps=cfg.steps,
            global_batch_size=cfg.micro_batch_size * cfg.grad_accum * info.world_size,
            seed=self.ctx.config.run.seed + 1,
            rank=info.rank,
            world_size=info.world_size,
        )

    def _refresh_snapshot(self) -> None:
        full = {name: full_tensor(p.detach()) for name, p in self.ctx.model.value_head.named_parameters()}
        self.value_snapshot.load_state_dict({k: v.float() for k, v in full.items()})

    def step(self, batches: list[dict[str, Any]]) -> StepResult:
        """As :meth:`Stage.step`, refreshing V_old first every ``value_snapshot_every`` stage steps."""
        if self.ctx.state.stage_step % self.settings.value_snapshot_every == 0:
            self._refresh_snapshot()
        return super().step(batches)

    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """Valid predictions of all heads, completion tokens and real tokens."""
        predictions = prediction_counts(
            batch["labels"], batch["attention_mask"], self.ctx.args.n_future_tokens
        )
        value_tokens, tokens = batch["loss_mask"].sum().cpu(), batch["attention_mask"].sum().cpu()
        return torch.stack([predictions.sum(), value_tokens.double(), tokens.double()])

    def micro_batch_loss(self, batch: dict[str, Any], counts: Counts, stats: StepStats) -> torch.Tensor:
        """``sum of weighted CE / N + value_coef * value loss * (this micro-batch's share of M)``."""
        cfg, model = self.settings, self.ctx.model
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            **self.weighting.loss_inputs(model, batch),
            loss_options=self.loss_options,
        )
        mtp = out.loss / max(counts.predictions, 1)
        total, critic = mtp, torch.zeros((), device=mtp.device)
        if self.trains_critic:
            with torch.no_grad():
                old = self.value_snapshot(out.trunk.detach().float())
            critic = value_loss(
                out.values.float(),
                batch["rewards"],
                batch["loss_mask"],
                old_values=old,
                clip_range=cfg.clip_range or None,
                loss_type=cfg.value_loss,
                huber_delta=cfg.huber_delta,
            ) * (batch["loss_mask"].sum() / max(counts.value_tokens, 1))
            total = mtp + cfg.value_coef * critic
        stats.add(mtp_loss=mtp.detach(), value_loss=critic.detach())
        stats.add_critic(out.values, batch["rewards"], batch["loss_mask"])
        n_heads = self.ctx.args.n_future_tokens
        stats.add_loss_stats(out.stats, prediction_counts(batch["labels"], batch["attention_mask"], n_heads))
        return total

    def metrics(self, reduced: ReducedStep) -> dict[str, float]:
        """``mtp_loss``, ``total_loss``, ``value_loss`` (when trained) and the pooled loss statistics."""
        metrics = {"mtp_loss": reduced.sums["mtp_loss"], "total_loss": reduced.sums["total_loss"]}
        if self.trains_critic:
            metrics["value_loss"] = reduced.sums["value_loss"]
        return metrics | reduced.loss_stats
