"""The trainer's stages (docs/DESIGN.md, "Trainer stages"): stage 1 pre-trains the critic on the trunk,
stage 2 trains the weighted multi-token loss (plus the clipped value loss). Both are
:class:`~wmtp_train.train.step.Stage` subclasses: what they train, what they sample, and the loss of a
micro-batch.

V_old for stage 2's clipped value loss: a frozen copy of the value head, refreshed every
``stage2.value_snapshot_every`` steps, applied to the detached trunk states the model returns for the
current forward pass. Clipping then bounds how far V may move from the lagged critic within one snapshot
period. The copy is saved in checkpoints so resume is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from wmtp_kernels import value_loss
from wmtp_train.config import Stage1Config, Stage2Config
from wmtp_train.data.index import OffsetIndex
from wmtp_train.data.samplers import BalancedSampler, CurriculumSampler, UniformSampler
from wmtp_train.model import LossOptions, ValueHead
from wmtp_train.train.metrics import ReducedStep, StepStats, prediction_counts
from wmtp_train.train.model_builder import ModelBuilder
from wmtp_train.train.parallelize import full_tensor
from wmtp_train.train.step import Counts, Stage, StageContext, StepResult
from wmtp_train.train.trunk_cache import TrunkStateCache
from wmtp_train.train.weighting import WEIGHTINGS, TokenWeighting


class CriticStage(Stage):
    """Stage 1: regress the value head onto the reward over the completion tokens (the model's
    ``trunk_only`` pass: no head block, no unembedding), on a 50/50 correct / incorrect sampler. The
    trunk is frozen unless ``stage1.unfreeze_trunk``; with ``stage1.cache_trunk_states`` its states are
    computed once before the first step (:class:`~wmtp_train.train.trunk_cache.TrunkStateCache`) and the
    steps run the value head alone."""

    name = "stage1"
    loss_key = "value_loss"
    trains_critic = True
    trunk_states: TrunkStateCache | None = None

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

    def make_sampler(self, index: OffsetIndex) -> BalancedSampler | UniformSampler:
        """``stage1.sampler``'s sampler, seeded with ``run.seed``."""
        info, seed = self.ctx.info, self.ctx.config.run.seed
        if self.settings.sampler == "uniform":
            return UniformSampler(len(index), seed=seed, rank=info.rank, world_size=info.world_size)
        return BalancedSampler(
            index.is_correct,
            index.difficulty,
            seed=seed,
            rank=info.rank,
            world_size=info.world_size,
        )

    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """No predictions; the completion and real tokens."""
        value_tokens, tokens = batch["loss_mask"].sum(), batch["attention_mask"].sum()
        return torch.stack([torch.zeros_like(tokens), value_tokens, tokens]).double().cpu()

    def step(self, batches: list[dict[str, Any]]) -> StepResult:
        """As :meth:`Stage.step`; with ``cache_trunk_states`` the first step builds the cache (collective)."""
        if self.settings.cache_trunk_states and self.trunk_states is None:
            if self.ctx.data is None:
                raise ValueError("stage1.cache_trunk_states needs the run's data (StageContext.data)")
            self.trunk_states = TrunkStateCache(self.ctx.model, self.ctx.data, self.settings.micro_batch_size)
            self.ctx.print(
                f"stage1: trunk states of {len(self.trunk_states.states)} records cached "
                f"({self.trunk_states.nbytes / 2**20:.0f} MiB)"
            )
        return super().step(batches)

    def micro_batch_loss(self, batch: dict[str, Any], counts: Counts, stats: StepStats) -> torch.Tensor:
        """The value loss of the micro-batch's completion tokens over the step's value-token count."""
        cfg = self.settings
        if self.trunk_states is not None:
            hidden, completion = self.trunk_states.gather(batch["indices"])
            values = self.ctx.model.value_head(hidden, completion)
        else:
            completion = batch["loss_mask"]
            values = self.ctx.model(
                batch["input_ids"], batch["attention_mask"], trunk_only=True, value_mask=completion
            ).values
        rewards = batch["rewards"]
        loss = value_loss(
            values.float(), rewards, completion, loss_type=cfg.value_loss, huber_delta=cfg.huber_delta
        )
        stats.add_critic(values, rewards, completion)
        return loss * completion.sum() / counts.value_tokens.clamp(min=1).float()

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

    def prepare(self) -> None:
        """As :meth:`Stage.prepare`, plus the value-head snapshot V_old."""
        super().prepare()
        with torch.device(self.ctx.info.device):
            self.value_snapshot = ValueHead(self.ctx.args)
        self.value_snapshot.requires_grad_(False)
        self._refresh_snapshot()

    def checkpoint_state(self) -> dict[str, Any]:
        """As :meth:`Stage.checkpoint_state`, plus the value-head snapshot."""
        return {**super().checkpoint_state(), "value_snapshot": self.value_snapshot}

    def make_sampler(self, index: OffsetIndex) -> CurriculumSampler:
        """A :class:`~wmtp_train.data.samplers.CurriculumSampler` over the recipe's records."""
        cfg, info = self.settings, self.ctx.info
        self.records = self.weighting.records(index)
        records = slice(None) if self.records is None else self.records
        return CurriculumSampler(
            index.difficulty[records],
            total_steps=cfg.steps,
            global_batch_size=cfg.micro_batch_size * cfg.grad_accum * info.world_size,
            seed=self.ctx.config.run.seed + 1,
            rank=info.rank,
            world_size=info.world_size,
            lengths=index.lengths[records],  # record bytes: a proxy of the token count
            length_window=cfg.length_window,
        )

    def _refresh_snapshot(self) -> None:
        full = {name: full_tensor(p.detach()) for name, p in self.ctx.model.value_head.named_parameters()}
        self.value_snapshot.load_state_dict({k: v.float() for k, v in full.items()})

    def step(self, batches: list[dict[str, Any]]) -> StepResult:
        """As :meth:`Stage.step`, refreshing V_old first every ``value_snapshot_every`` stage steps."""
        if self.ctx.state.stage_step % self.settings.value_snapshot_every == 0:
            self._refresh_snapshot()
        return super().step(batches)

    def old_values(self, trunk: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """V_old: the snapshot applied to the detached trunk states [B, T, d] (``completion``: the loss
        mask, for the hazard head)."""
        with torch.no_grad():
            return self.value_snapshot(trunk.detach().float(), completion)

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
        options = (
            self.loss_options
            if self.read_back
            else dataclasses.replace(self.loss_options, return_stats=False)
        )
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            **self.weighting.loss_inputs(model, batch),
            loss_options=options,
            value_mask=batch["loss_mask"],
        )
        mtp = out.loss / counts.predictions.clamp(min=1).float()
        total, critic = mtp, torch.zeros((), device=mtp.device)
        if self.trains_critic:
            old = self.old_values(out.trunk, batch["loss_mask"])
            critic = value_loss(
                out.values.float(),
                batch["rewards"],
                batch["loss_mask"],
                old_values=old,
                clip_range=cfg.clip_range or None,
                loss_type=cfg.value_loss,
                huber_delta=cfg.huber_delta,
            ) * (batch["loss_mask"].sum() / counts.value_tokens.clamp(min=1).float())
            total = mtp + cfg.value_coef * critic
        stats.add(mtp_loss=mtp.detach(), value_loss=critic.detach())
        stats.add_critic(out.values, batch["rewards"], batch["loss_mask"])
        if out.stats is not None:
            n_heads = self.ctx.args.n_future_tokens
            head_counts = prediction_counts(batch["labels"], batch["attention_mask"], n_heads)
            stats.add_loss_stats(out.stats, head_counts)
        return total

    def metrics(self, reduced: ReducedStep) -> dict[str, float]:
        """``mtp_loss``, ``total_loss``, ``value_loss`` (when trained) and the pooled loss statistics."""
        metrics = {"mtp_loss": reduced.sums["mtp_loss"], "total_loss": reduced.sums["total_loss"]}
        if self.trains_critic:
            metrics["value_loss"] = reduced.sums["value_loss"]
        return metrics | reduced.loss_stats


def build_stages(ctx: StageContext, builder: ModelBuilder) -> dict[str, Stage]:
    """The run's stages in order: stage 1 when enabled, then stage 2 with the configured token weighting.

    Args:
        ctx: what the stages share with the run.
        builder: builds the extra models a weighting recipe needs.

    Returns:
        The stages by name.
    """
    weighting = WEIGHTINGS[ctx.config.stage2.weighting](ctx.config, builder)
    stages = [CriticStage(ctx)] if ctx.config.stage1.enabled else []
    stages.append(WeightedMTPStage(ctx, weighting))
    return {stage.name: stage for stage in stages}
