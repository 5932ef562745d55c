"""The trainer: stage 0 (process group, data, model), the stages in order (:mod:`wmtp_train.train.stages`),
stage 3 (checkpoints, export), with metrics on rank 0.

The trainer is the loop and the I/O around the parts: :class:`~wmtp_train.train.inputs.TrainingData`
(tokenizer, datasets, micro-batches), :class:`~wmtp_train.train.model_builder.ModelBuilder` (model
arguments, sharded model, export), the stages (one optimizer step each), a
:class:`~wmtp_train.train.weighting.TokenWeighting` recipe, the
:class:`~wmtp_train.train.checkpoint.Checkpointer` and the :class:`~wmtp_train.train.tracking.Tracker`.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmtp_train.config import RUN_CONFIG_FILE, TrainConfig
from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.eval.metrics import ev_moments, explained_variance_from_moments
from wmtp_train.train.checkpoint import Checkpointer, FoundCheckpoint
from wmtp_train.train.inputs import TrainingData
from wmtp_train.train.model_builder import ModelBuilder
from wmtp_train.train.parallelize import DistInfo, all_reduce, init_distributed, seed_everything
from wmtp_train.train.stages import build_stages
from wmtp_train.train.step import NonFiniteAbort, Stage, StageContext, TrainerState
from wmtp_train.train.tracking import Tracker

__all__ = ["NonFiniteAbort", "Trainer", "peak_memory_mb", "train"]

# Progress-line fields: (metric, label).
_PROGRESS = (
    ("total_loss", "loss"),
    ("mtp_loss", "mtp"),
    ("ce_head1", "ce1"),
    ("value_loss", "vloss"),
    ("explained_variance_ema", "ev"),
    ("grad_norm", "gnorm"),
)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """One training run (every rank builds one).

    Args:
        config: the resolved configuration.
        resume: a checkpoint / run directory to resume from, ``"latest"`` (the latest complete checkpoint
            under ``run.out_dir``), or None for a fresh run.
    """

    def __init__(self, config: TrainConfig, resume: str | None = None):
        self.config = config
        self.out = Path(config.run.out_dir)
        self.info: DistInfo = init_distributed(config.run.device)
        if self.info.device.type == "cpu":
            threads = config.run.threads or max(1, (os.cpu_count() or 1) // self.info.local_world_size)
            torch.set_num_threads(threads)
        seed_everything(config.run.seed + self.info.rank)
        self.data = TrainingData(config, self.info)
        self.builder = ModelBuilder(config, self.info, self.data.tokenizer.vocab_size)
        self.model = self.builder.build(config.model.checkpoint_dir)
        self.state = TrainerState()
        self.stages = self._make_stages()
        self.state.stage = next(iter(self.stages))
        self.checkpointer = Checkpointer(
            self.out / "checkpoints", config.checkpoint.keep, self.info.rank, self.info.world_size
        )
        self.resume_from = self.checkpointer.find(resume)
        if resume is not None and self.resume_from is None:
            self.print(f"no complete checkpoint found for --resume {resume}; starting fresh")
        self.metrics_history: list[dict[str, float]] = []
        self.tracker = self._start_tracking()

    def _make_stages(self) -> dict[str, Stage]:
        context = StageContext(self.config, self.model, self.builder.args, self.info, self.state, self.data)
        return build_stages(context, self.builder)

    def _start_tracking(self) -> Tracker:
        cfg = self.config.tracking
        run_id_file = self.out / "mlflow_run_id"
        run_id = None
        if self.resume_from is not None and run_id_file.is_file():
            run_id = run_id_file.read_text().strip() or None
        tracker = Tracker(
            self.out,
            active=self.info.is_main,
            use_mlflow=cfg.enabled,
            tracking_uri=cfg.tracking_uri,
            experiment=cfg.experiment,
            run_name=cfg.run_name or self.config.recipe,
            run_id=run_id,
        )
        if self.info.is_main:
            if tracker.run_id:
                run_id_file.write_text(tracker.run_id)
            tracker.log_params(self.config.flat())
            (self.out / RUN_CONFIG_FILE).write_text(self.config.to_toml())
        return tracker

    def print(self, text: str) -> None:
        """Print on rank 0 (flushed)."""
        if self.info.is_main:
            print(text, flush=True)

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self.stages[self.state.stage]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Save the current state (collective).

        Returns:
            The checkpoint directory.
        """
        path = self.checkpointer.save(self.state, self.stage.checkpoint_state())
        self.print(f"checkpoint: {path}")
        return path

    def _restore(self, found: FoundCheckpoint) -> None:
        self.state.stage = found.manifest["stage"]
        self.stage.setup(self.data.train.index)
        self.checkpointer.load(found, self.state, self.stage.checkpoint_state())
        state = self.state
        self.print(f"resumed from {found.path} (step {state.step}, {state.stage} step {state.stage_step})")

    # ------------------------------------------------------------------ loop
    def _run_stage(self, stage: Stage) -> bool:
        """Run a stage to its end or to ``run.max_steps``; True when the stage finished."""
        every, max_steps = self.config.checkpoint.every, self.config.run.max_steps
        self.model.train()
        while self.state.stage_step < stage.steps:
            if 0 < max_steps <= self.state.step:
                return False
            lr = stage.scheduler.get_last_lr()[0]
            start = time.perf_counter()
            result = stage.step([self.data.batch(indices) for indices in stage.next_indices()])
            elapsed = time.perf_counter() - start
            self.state.step += 1
            self.state.stage_step += 1
            self.state.tokens += result.tokens
            metrics = result.metrics | {
                "stage": float(stage.name.removeprefix("stage")),
                "lr": lr,
                "tokens_per_s": result.tokens / elapsed,
                "tokens": float(self.state.tokens),
                "step_time_s": elapsed,
                "peak_memory_mb": peak_memory_mb(self.info.device),
                "skipped_steps": float(self.state.skipped_steps),
            }
            self.metrics_history.append({"step": float(self.state.step), **metrics})
            self.tracker.log_metrics(metrics, self.state.step)
            if self.state.stage_step % self.config.run.log_every == 0 or self.state.stage_step == stage.steps:
                self._progress(stage, metrics)
            if every and self.state.step % every == 0:
                self.save_checkpoint()
        return True

    def _progress(self, stage: Stage, metrics: dict[str, float]) -> None:
        parts = [f"[{stage.name}] {self.state.stage_step}/{stage.steps} (step {self.state.step})"]
        parts += [f"{label} {metrics[key]:.4f}" for key, label in _PROGRESS if key in metrics]
        parts.append(f"lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s")
        self.print("  ".join(parts))

    @torch.no_grad()
    def evaluate_value(self, dataset: LazyJsonlDataset, label: str) -> float:
        """Explained variance of the critic on a fixed random subset of ``dataset`` (all ranks).

        Args:
            dataset: a :class:`~wmtp_train.data.dataset.LazyJsonlDataset`.
            label: metric name suffix.

        Returns:
            The explained variance over ``data.eval_batches`` batches per rank.
        """
        cfg = self.config
        size = cfg.stage1.micro_batch_size
        n = min(len(dataset), cfg.data.eval_batches * size * self.info.world_size)
        order = np.random.default_rng(cfg.run.seed + 7).permutation(len(dataset))[:n]
        mine = order[self.info.rank :: self.info.world_size]
        moments = torch.zeros(5, dtype=torch.float64)
        self.model.eval()
        for start in range(0, len(mine), size):
            batch = self.data.batch(mine[start : start + size], dataset)
            values = self.model.trunk_forward(
                batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
            ).values
            moments += ev_moments(values, batch["rewards"], batch["loss_mask"]).cpu()
        self.model.train()
        ev = explained_variance_from_moments(all_reduce(moments, self.info.device))
        self.tracker.log_metrics({f"eval/{label}_explained_variance": ev}, self.state.step)
        self.print(f"eval: {label} explained variance {ev:.4f} ({int(moments[0])} tokens on rank 0)")
        return ev

    def _evaluate_critic(self, stage: str) -> dict[str, float]:
        if self.config.data.eval_batches == 0:
            return {}
        out = {f"{stage}_train": self.evaluate_value(self.data.train, f"{stage}_train")}
        if self.data.heldout is not None:
            out[f"{stage}_heldout"] = self.evaluate_value(self.data.heldout, f"{stage}_heldout")
        return out

    def export(self) -> Path | None:
        """Write the consolidated Meta-format export to ``<out>/export`` (collective; rank 0 writes).

        Returns:
            The export directory on rank 0, None elsewhere.
        """
        path = self.builder.export(self.model, self.out / "export")
        if path is not None:
            self.print(f"export: {path}")
        return path

    def fit(self) -> dict[str, Any]:
        """Run (or continue) every stage, checkpoint, export, and close tracking.

        Returns:
            ``{"steps", "finished", "evals", "history"}``.
        """
        cfg = self.config
        self.print(f"resolved config ({cfg.recipe}):\n{cfg.to_toml()}")
        status, evals, finished = "FAILED", {}, True
        try:
            if self.resume_from is not None:
                self._restore(self.resume_from)
            else:
                self.stage.setup(self.data.train.index)
            names = list(self.stages)
            for name in names[names.index(self.state.stage) :]:
                if name != self.state.stage:
                    self.stage.release()
                    self.state.stage, self.state.stage_step = name, 0
                    self.stage.setup(self.data.train.index)
                finished = self._run_stage(self.stage)
                if not finished:
                    break
                if self.stage.trains_critic:
                    evals.update(self._evaluate_critic(name))
            ckpt = self.checkpointer.manager.step_dir(self.state.step)
            if self.checkpointer.last_saved != self.state.step:
                ckpt = self.save_checkpoint()
            export = self.export() if cfg.checkpoint.export else None
            if cfg.tracking.log_artifacts and self.info.is_main:
                self.tracker.log_artifacts(export or ckpt, "export" if export else "checkpoint")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.tracker.close(status)
        return {
            "steps": self.state.step,
            "finished": finished,
            "evals": evals,
            "history": self.metrics_history,
        }


def train(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it (the process group stays initialised for the caller).

    Args:
        config: the resolved configuration.
        resume: see :class:`Trainer`.

    Returns:
        :meth:`Trainer.fit`'s summary.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    return Trainer(config, resume).fit()
