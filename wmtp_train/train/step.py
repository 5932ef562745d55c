"""One optimizer step of a training stage: the machinery every stage shares, and the run's counters.

A :class:`Stage` owns its trained parameters, optimizer, LR schedule and sampler. :meth:`Stage.step` is
one optimizer step on micro-batches it is handed (no data loading, no logging, no checkpointing), so the
same step runs in the trainer's loop, in a benchmark, or on fake tensors. The stages themselves are in
:mod:`wmtp_train.train.stages`.

Loss normalisation across gradient accumulation and data-parallel ranks: each step first counts, over
all its micro-batches, the valid (head, position) predictions N (summed over the H heads) and the trained
value tokens M on every rank, and all-reduces both. A micro-batch's MTP term is
``sum_of_weighted_CE / N_global`` and its value term ``sum_of_value_loss / M_global``, each multiplied by
the world size because FSDP2 averages gradients over ranks. So the step's gradient is that of the global
token-mean loss, whatever the split into ranks and micro-batches: every token counts the same, whichever
rank saw it (a per-rank mean would over-weight the tokens of ranks that drew short sequences). With equal
valid counts per head (prompts of at least H tokens) ``sum / N`` equals the mean over heads of per-head
means (docs/DESIGN.md, "Normalisation and masking").
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

from wmtp_train.config import Stage1Config, Stage2Config, TrainConfig
from wmtp_train.data.index import OffsetIndex
from wmtp_train.data.samplers import BalancedSampler, CurriculumSampler
from wmtp_train.eval.metrics import explained_variance_from_moments
from wmtp_train.model import ModelArgs, MTPTransformer
from wmtp_train.train.checkpoint import FrozenBase, ModelOptimizerState
from wmtp_train.train.inputs import TrainingData
from wmtp_train.train.lr_schedule import warmup_cosine
from wmtp_train.train.metrics import ReducedStep, RunningExplainedVariance, StepStats
from wmtp_train.train.parallelize import DistInfo, all_reduce, full_tensor, refresh_trainable_parameters


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
    data: TrainingData | None = None
    """The run's inputs (None where a stage is stepped on batches made elsewhere: the memory estimate,
    benchmarks); ``stage1.cache_trunk_states`` needs them."""

    def print(self, text: str) -> None:
        """Print on rank 0 (flushed)."""
        if self.info.is_main:
            print(text, flush=True)


class Counts(NamedTuple):
    """A step's token counts over all its micro-batches and all ranks (float64 scalars on the CPU, kept as
    tensors so that the step never waits for the host)."""

    predictions: torch.Tensor
    """Valid (head, position) predictions, summed over the heads: the MTP loss normaliser."""
    value_tokens: torch.Tensor
    """Completion tokens: the value loss normaliser."""
    tokens: torch.Tensor
    """Real tokens."""


class StepResult(NamedTuple):
    """What one optimizer step reports."""

    metrics: dict[str, float]
    """The step's metrics (:mod:`wmtp_train.train.metrics`)."""
    tokens: int
    """Real tokens of the step on all ranks."""


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, device_type: str) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) with weight decay on matrices only (not on norms, biases or vectors).

    The implementation is the one PyTorch picks for the device (``foreach`` on CUDA, a loop over the
    tensors on the CPU), stated explicitly so that the memory estimate, whose fake tensors live on the
    CPU, runs the CUDA one: its step holds a temporary the size of the optimizer's parameter shard.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    foreach = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=foreach)


class Stage(ABC):
    """One training stage: its parameters, its sampler, and the loss of a micro-batch.

    Args:
        ctx: the run's model, configuration and counters.
    """

    name: ClassVar[str]
    """``stage1`` or ``stage2`` (the checkpoint manifest's ``stage``)."""
    loss_key: ClassVar[str]
    """The metric whose finiteness decides whether the step is applied."""
    read_back: bool = True
    """Whether a step reads its results back to the host: metrics, the token count, the non-finite checks
    and the loss kernel's statistics. False runs the very same step without a host synchronisation, so
    that it runs on fake tensors (memory estimation, :mod:`wmtp_train.train.memory`): no metrics, and the
    update is always applied."""

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
        """:meth:`prepare`, and the sampler.

        Args:
            index: the training set's offset index.
        """
        self.prepare()
        self.sampler = self.make_sampler(index)

    def prepare(self) -> None:
        """Select the trained parameters; make the optimizer and the LR schedule (all a step needs)."""
        cfg = self.settings
        self.select_parameters()
        lora = self.ctx.config.lora
        if lora.enabled:  # LoRA narrows every stage's choice to the adapters and the fully trained parts
            for name, param in self.ctx.model.named_parameters():
                if not lora.is_trained(name):
                    param.requires_grad_(False)
        refresh_trainable_parameters(self.ctx.model)
        params = [p for p in self.ctx.model.parameters() if p.requires_grad]
        run_device = self.ctx.config.run.device  # the estimate's own device is a CPU stand-in for it
        device_type = self.ctx.info.device.type if run_device == "auto" else run_device
        self.optimizer = adamw(params, cfg.lr, cfg.weight_decay, device_type)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    def release(self) -> None:
        """Drop the optimizer (its state), the schedule and the sampler once the stage is over, so that the
        next stage does not carry them (with ``stage1.unfreeze_trunk`` stage 1's AdamW moments are twice
        the trunk's parameters)."""
        self.optimizer = self.scheduler = self.sampler = None

    def checkpoint_state(self) -> dict[str, Any]:
        """The stage's checkpoint entries (DCP ``Stateful`` objects, restored in place); with LoRA the
        model entry holds only what LoRA trains, and ``frozen_base`` fingerprints the rest."""
        model, lora = self.ctx.model, self.ctx.config.lora
        saved = lora.is_trained if lora.enabled else None
        state = {
            "app": ModelOptimizerState(model, self.optimizer, saved),
            "lr_scheduler": self.scheduler,
            "sampler": self.sampler,
            "running_ev": self.running_ev,
        }
        if lora.enabled:
            state["frozen_base"] = FrozenBase(model, lora.is_trained, self.ctx.info.device)
        return state

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
            The step's metrics and token count (empty and 0 without :attr:`read_back`).
        """
        device, world = self.ctx.info.device, self.ctx.info.world_size
        local = torch.stack([self.counts(batch) for batch in batches]).sum(0)
        counts = Counts(*all_reduce(local, device))
        stats = StepStats()
        for batch in batches:
            loss = self._poison(self.micro_batch_loss(batch, counts, stats))
            stats.add(**{self.loss_key: loss.detach()})
            (loss * world).backward()
        norm = self._clip_gradients()
        if not self.read_back:
            self._finish_update(applied=True, norm=math.nan)
            return StepResult({}, 0)
        reduced = stats.reduce(device)
        norm = float(full_tensor(norm))
        applied = math.isfinite(reduced.sums[self.loss_key]) and math.isfinite(norm)
        self._finish_update(applied, norm)
        metrics = self.metrics(reduced)
        if self.trains_critic:
            moments = reduced.explained_variance_moments
            metrics["explained_variance"] = explained_variance_from_moments(moments)
            metrics["explained_variance_ema"] = self.running_ev.update(moments)
        metrics |= {"grad_norm": norm, "step_skipped": float(not applied)}
        return StepResult(metrics, int(counts.tokens))

    def _poison(self, loss: torch.Tensor) -> torch.Tensor:
        """Debug: a NaN loss at the configured global steps (``numerics.inject_nan_steps``)."""
        if self.ctx.state.step + 1 in self.ctx.config.numerics.nan_steps():
            return loss * float("nan")
        return loss

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm`` (none when 0); returns their total norm (a tensor)."""
        max_norm = self.settings.max_grad_norm
        params = [p for p in self.ctx.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def _finish_update(self, applied: bool, norm: float) -> None:
        """Step the optimizer when ``applied`` (else count a skip), clear the gradients, advance the LR.

        A step whose loss or gradient norm is non-finite is skipped: it leaves the parameters and the
        optimizer state untouched but still advances the LR schedule; ``numerics.max_consecutive_skips``
        skips in a row raise :class:`NonFiniteAbort`.
        """
        state = self.ctx.state
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
