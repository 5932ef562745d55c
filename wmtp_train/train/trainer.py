"""The trainer: stage 0 (setup), stage 1 (critic pre-training), stage 2 (weighted MTP), stage 3
(checkpoints, export), with metrics on rank 0.

Loss normalisation across gradient accumulation and data-parallel ranks: each step first collates all
its micro-batches, counts the valid (head, position) predictions N (summed over the H heads) and the
trained value tokens M on every rank, and all-reduces both. A micro-batch's MTP term is
``sum_of_weighted_CE / N_global`` and its value term ``sum_of_value_loss / M_global``, each multiplied
by the world size because FSDP2 averages gradients over ranks. So the step's gradient is that of the
global token-mean loss, whatever the split into ranks and micro-batches: every token counts the same,
whichever rank saw it (a per-rank mean would over-weight the tokens of ranks that drew short
sequences). With equal valid counts per head (prompts of at least H tokens) ``sum / N`` equals SPEC §2's
mean over heads of per-head means.

V_old for the clipped value loss: a frozen copy of the value head, refreshed every
``stage2.value_snapshot_every`` steps, applied to the detached trunk states of the current forward pass
(captured by a forward hook on ``value_head``). Clipping then bounds how far V may move from the lagged
critic within one snapshot period. The copy is saved in checkpoints so resume is exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.tensor import DTensor

from wmtp_kernels.reference import value_loss
from wmtp_train.config import TrainConfig
from wmtp_train.model.meta_checkpoint import PARAMS_FILE
from wmtp_train.model.mtp import LossOptions, ModelArgs, MTPTransformer, ValueHead, build_model, resolve_args
from wmtp_train.train.checkpoint import (
    CheckpointManager,
    FoundCheckpoint,
    ModelOptimizerState,
    RNGState,
    load_checkpoint,
    rng_key,
)
from wmtp_train.train.parallelize import (
    DistInfo,
    init_distributed,
    mixed_precision_policy,
    seed_everything,
    shard_model,
)
from wmtp_train.train.tracking import Tracker
from wmtp_train.train.weighting import (
    ev_moments,
    excess_loss_scores,
    explained_variance_from_moments,
    lr_factor,
    rho1_weights,
    valid_prediction_count,
)

log = logging.getLogger("wmtp_train")

IGNORE_INDEX = -100


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


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


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
        self.state = TrainerState(stage="stage1" if config.stage1.enabled else "stage2")
        self.ckpt = CheckpointManager(self.out / "checkpoints", config.checkpoint.keep, self.info.rank)
        self.nan_steps = config.numerics.nan_steps()
        self.metrics_history: list[dict[str, float]] = []
        self._setup_data()
        self.model, self.model_args = self._build_model()
        self.reference_model = self._build_reference() if config.stage2.weighting == "rho1" else None
        self._trunk_states: list[torch.Tensor] = []
        self.model.value_head.register_forward_hook(lambda mod, args, out: self._trunk_states.append(args[0]))
        self.value_snapshot: ValueHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.sampler = None
        self._last_saved = -1
        self.resume_from = self._find_resume(resume)
        self.tracker = self._start_tracking()

    # ----------------------------------------------------------------- setup
    def _setup_data(self) -> None:
        from wmtp_train.data.dataset import LazyJsonlDataset
        from wmtp_train.data.tokenizer import load_tokenizer

        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.model.checkpoint_dir or None)
        train_path, heldout_path = cfg.data.path, cfg.data.heldout_path
        if not train_path:
            from wmtp_train.data import ensure_default_dataset

            if self.info.is_main:
                default = ensure_default_dataset()
            dist.barrier()
            default = ensure_default_dataset()  # cached now: every rank gets the paths
            train_path = str(default.train_path)
            heldout_path = heldout_path or str(default.heldout_path)
        self.dataset = LazyJsonlDataset(
            train_path, self.tokenizer, cfg.data.max_len, on_error=cfg.data.on_error
        )
        self.heldout = (
            LazyJsonlDataset(heldout_path, self.tokenizer, cfg.data.max_len, on_error=cfg.data.on_error)
            if heldout_path
            else None
        )

    def _model_args(self) -> ModelArgs:
        cfg = self.config.model
        if cfg.checkpoint_dir:
            params = json.loads((Path(cfg.checkpoint_dir) / PARAMS_FILE).read_text())
            args = ModelArgs.from_params_json(params)
        else:
            args = resolve_args(cfg.preset)
        if cfg.max_seq_len:
            args = dataclasses.replace(args, max_seq_len=cfg.max_seq_len)
        if self.config.data.max_len > args.max_seq_len:
            raise ValueError(
                f"data.max_len ({self.config.data.max_len}) exceeds the model's "
                f"max_seq_len ({args.max_seq_len})"
            )
        if self.tokenizer.vocab_size > args.vocab_size:
            raise ValueError(
                f"tokenizer vocab ({self.tokenizer.vocab_size}) exceeds the model's "
                f"vocab_size ({args.vocab_size})"
            )
        return args

    def _initial_full_state(self, args: ModelArgs, checkpoint_dir: str) -> dict[str, torch.Tensor]:
        """Full (unsharded) initial weights: a Meta checkpoint, or a fresh init seeded by ``run.seed``.

        Initialising a full model (rather than sharded DTensors) makes the initial weights independent
        of the world size, so 1-rank and N-rank runs start identical. The seed also covers the fresh
        value head of a Meta checkpoint: every rank must take its shard of the same initialisation.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            if checkpoint_dir:
                from wmtp_train.model.meta_checkpoint import load_meta_checkpoint

                model, _ = load_meta_checkpoint(checkpoint_dir, device="cpu", max_seq_len=args.max_seq_len)
                return model.state_dict()
            return build_model(args, device="cpu").state_dict()

    def _materialise(self, args: ModelArgs, checkpoint_dir: str) -> MTPTransformer:
        cfg = self.config
        model = build_model(args, device="meta")
        if cfg.parallel.fsdp:
            shard_model(model, mixed_precision_policy(cfg.parallel.mixed_precision, self.info.device))
        model.to_empty(device=self.info.device)
        full = self._initial_full_state(args, checkpoint_dir)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        return model

    def _build_model(self) -> tuple[MTPTransformer, ModelArgs]:
        args = self._model_args()
        return self._materialise(args, self.config.model.checkpoint_dir), args

    def _build_reference(self) -> MTPTransformer:
        """Rho-1's frozen reference: a checkpoint, or the run's initial weights."""
        ref_dir = self.config.rho1.reference_checkpoint or self.config.model.checkpoint_dir
        ref = self._materialise(self.model_args, ref_dir)
        ref.requires_grad_(False)
        return ref

    def _find_resume(self, resume: str | None) -> FoundCheckpoint | None:
        if resume is None:
            return None
        found = [self.ckpt.resolve(None if resume == "latest" else resume) if self.info.is_main else None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            self.print(f"no complete checkpoint found for --resume {resume}; starting fresh")
        return found[0]

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
            (self.out / "config.toml").write_text(self.config.to_toml())
        return tracker

    def print(self, text: str) -> None:
        """Print on rank 0 (flushed)."""
        if self.info.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------- batches
    def _next_batch(self, indices: Iterator[int], size: int, dataset) -> dict[str, Any]:
        from wmtp_train.data.dataset import collate

        samples = [dataset[next(indices)] for _ in range(size)]
        return collate(samples, self.tokenizer.pad_id, self.config.data.padding_side, IGNORE_INDEX)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.info.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------- optimizer
    def _make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def _make_scheduler(self, warmup: int, total: int, min_ratio: float) -> None:
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total, min_ratio)
        )

    def _setup_stage1(self) -> None:
        from wmtp_train.data.samplers import BalancedSampler

        cfg = self.config.stage1
        model = self.model
        model.requires_grad_(False)
        model.value_head.requires_grad_(True)
        if cfg.unfreeze_trunk:
            model.tok_embeddings.requires_grad_(True)
            for block in model.layers[:-1]:
                block.requires_grad_(True)
        self._make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
        self._make_scheduler(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        index = self.dataset.index
        self.sampler = BalancedSampler(
            index.is_correct,
            index.difficulty,
            seed=self.config.run.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )

    def _setup_stage2(self) -> None:
        from wmtp_train.data.samplers import CurriculumSampler

        cfg = self.config.stage2
        self.model.requires_grad_(True)
        if cfg.value_coef == 0:
            self.model.value_head.requires_grad_(False)
        self._make_optimizer(
            [p for p in self.model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay
        )
        self._make_scheduler(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        self.sampler = CurriculumSampler(
            self.dataset.index.difficulty,
            total_steps=cfg.steps,
            global_batch_size=cfg.micro_batch_size * cfg.grad_accum * self.info.world_size,
            seed=self.config.run.seed + 1,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self.value_snapshot = ValueHead(self.model_args).to(self.info.device)
        self.value_snapshot.requires_grad_(False)
        self._refresh_snapshot()

    def _refresh_snapshot(self) -> None:
        full = {name: _full(p.detach()) for name, p in self.model.value_head.named_parameters()}
        self.value_snapshot.load_state_dict({k: v.float() for k, v in full.items()})

    # ------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.scheduler,
            "sampler": self.sampler,
            "trainer": self.state,
            rng_key(self.info.rank): RNGState(),
        }
        if self.value_snapshot is not None:
            state["value_snapshot"] = self.value_snapshot.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Save the current state (collective).

        Returns:
            The checkpoint directory.
        """
        path = self.ckpt.save(
            self.state.step,
            self._checkpoint_state(),
            {
                "stage": self.state.stage,
                "stage_step": self.state.stage_step,
                "world_size": self.info.world_size,
            },
        )
        self._last_saved = self.state.step
        self.print(f"checkpoint: {path}")
        return path

    def _restore(self, found: FoundCheckpoint) -> None:
        stage = found.manifest["stage"]
        self.state.stage = stage
        if stage == "stage1":
            self._setup_stage1()
        else:
            self._setup_stage2()
        state = self._checkpoint_state()
        load_checkpoint(found.path, state)
        if "value_snapshot" in state:
            self.value_snapshot.load_state_dict(state["value_snapshot"])
        self.print(
            f"resumed from {found.path} (step {self.state.step}, {stage} step {self.state.stage_step})"
        )

    # ---------------------------------------------------------------- steps
    def _clip_and_step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = float(_full(norm))
        ok = loss_finite and math.isfinite(norm)
        if ok:
            self.optimizer.step()
            self.state.consecutive_skips = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            self.print(
                f"step {self.state.step + 1}: non-finite loss or grad norm ({norm}); step skipped "
                f"({self.state.consecutive_skips} in a row, {self.state.skipped_steps} in total)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule (by design)
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if self.state.consecutive_skips >= self.config.numerics.max_consecutive_skips:
            raise NonFiniteAbort(
                f"{self.state.consecutive_skips} consecutive steps with a non-finite loss or gradient norm "
                f"(last at global step {self.state.step + 1}, {self.state.stage} step "
                f"{self.state.stage_step + 1}, lr {self.scheduler.get_last_lr()[0]:.3g}, grad norm {norm}); "
                "aborting. Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )
        return norm, ok

    def _inject(self, loss: torch.Tensor) -> torch.Tensor:
        """Debug hook: NaN loss at the configured global steps (``numerics.inject_nan_steps``)."""
        if self.state.step + 1 in self.nan_steps:
            return loss * float("nan")
        return loss

    def _micro_batches(self, size: int, count: int) -> list[dict[str, Any]]:
        indices = iter(self.sampler)
        return [self._to_device(self._next_batch(indices, size, self.dataset)) for _ in range(count)]

    def _stage1_step(self) -> dict[str, float]:
        cfg = self.config.stage1
        world = self.info.world_size
        batches = self._micro_batches(cfg.micro_batch_size, cfg.grad_accum)
        counts = torch.stack(
            [
                torch.stack([b["loss_mask"].sum().double(), b["attention_mask"].sum().double()])
                for b in batches
            ]
        ).sum(0)
        n_value, n_tokens = _all_reduce_sum(counts, self.info.device).tolist()
        total = torch.zeros((), dtype=torch.float64)
        moments = torch.zeros(5, dtype=torch.float64)
        for batch in batches:
            out = self.model.trunk_forward(batch["input_ids"], batch["attention_mask"])
            self._trunk_states.clear()
            vl = value_loss(
                out.values.float(),
                batch["rewards"],
                batch["loss_mask"],
                loss_type=cfg.value_loss,
                huber_delta=cfg.huber_delta,
            )
            scaled = self._inject(vl * batch["loss_mask"].sum() / max(n_value, 1))
            (scaled * world).backward()
            total += scaled.detach().double().cpu()
            moments += ev_moments(out.values, batch["rewards"], batch["loss_mask"]).cpu()
        reduced = _all_reduce_sum(torch.cat([total.view(1), moments]), self.info.device)
        norm, ok = self._clip_and_step(cfg.max_grad_norm, math.isfinite(float(reduced[0])))
        return {
            "value_loss": float(reduced[0]),
            "explained_variance": explained_variance_from_moments(reduced[1:]),
            "grad_norm": norm,
            "step_skipped": float(not ok),
            "_tokens": n_tokens,
        }

    def _rho1_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        options = LossOptions(reduction="none", ignore_index=IGNORE_INDEX)
        ones = torch.ones(batch["input_ids"].shape, dtype=torch.float32, device=self.info.device)
        with torch.no_grad():
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            ce_model = self.model(*args, weights=ones, loss_options=options).loss
            ce_ref = self.reference_model(*args, weights=ones, loss_options=options).loss
        self._trunk_states.clear()
        cfg = self.config.rho1
        scores = excess_loss_scores(
            ce_model, ce_ref, batch["labels"], batch["attention_mask"], cfg.score, IGNORE_INDEX
        )
        return rho1_weights(
            scores, batch["labels"], batch["attention_mask"], cfg.top_k, cfg.unselected_weight, IGNORE_INDEX
        )

    def _stage2_step(self) -> dict[str, float]:
        cfg = self.config.stage2
        td = self.config.td
        world, heads = self.info.world_size, self.model_args.n_future_tokens
        if self.state.stage_step % cfg.value_snapshot_every == 0:
            self._refresh_snapshot()
        batches = self._micro_batches(cfg.micro_batch_size, cfg.grad_accum)
        counts = torch.stack(
            [
                torch.stack(
                    [
                        valid_prediction_count(
                            b["labels"].cpu(), b["attention_mask"].cpu(), heads, IGNORE_INDEX
                        ),
                        b["loss_mask"].sum().double().cpu(),
                        b["attention_mask"].sum().double().cpu(),
                    ]
                )
                for b in batches
            ]
        ).sum(0)
        n_pred, n_value, n_tokens = _all_reduce_sum(counts, self.info.device).tolist()
        options = LossOptions(
            gamma=td.gamma,
            beta=td.beta,
            min_weight=td.min_weight,
            max_weight=td.max_weight,
            terminal=td.terminal,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            return_stats=True,
            implementation=cfg.loss_impl,
            check_finite=self.config.numerics.check_finite,
        )
        sums = torch.zeros(3, dtype=torch.float64)  # mtp, value, total
        moments = torch.zeros(5, dtype=torch.float64)
        stat_sums: dict[str, float] = {}
        for batch in batches:
            weights = self._rho1_weights(batch) if cfg.weighting == "rho1" else None
            rewards = batch["rewards"] if cfg.weighting == "td" else None
            self._trunk_states.clear()
            out = self.model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                weights=weights,
                rewards=rewards,
                loss_options=options,
            )
            mtp = out.loss / max(n_pred, 1)
            total = mtp
            vl = torch.zeros((), device=mtp.device)
            if cfg.value_coef > 0:
                trunk = self._trunk_states[-1].detach()
                with torch.no_grad():
                    old = self.value_snapshot(trunk.float())
                vl = value_loss(
                    out.values.float(),
                    batch["rewards"],
                    batch["loss_mask"],
                    old_values=old,
                    clip_range=cfg.clip_range or None,
                    loss_type=cfg.value_loss,
                    huber_delta=cfg.huber_delta,
                ) * (batch["loss_mask"].sum() / max(n_value, 1))
                total = mtp + cfg.value_coef * vl
            self._trunk_states.clear()
            total = self._inject(total)
            (total * world).backward()
            sums += torch.stack([mtp.detach(), vl.detach(), total.detach()]).double().cpu()
            moments += ev_moments(out.values, batch["rewards"], batch["loss_mask"]).cpu()
            for key, value in (out.stats or {}).items():
                stat_sums[key] = stat_sums.get(key, 0.0) + float(value)
        stat_keys = sorted(stat_sums)
        local = torch.cat(
            [sums, moments, torch.tensor([stat_sums[k] / (len(batches) * world) for k in stat_keys])]
        )
        reduced = _all_reduce_sum(local, self.info.device)
        norm, ok = self._clip_and_step(cfg.max_grad_norm, math.isfinite(float(reduced[2])))
        metrics = {"mtp_loss": float(reduced[0]), "total_loss": float(reduced[2])}
        if cfg.value_coef > 0:
            metrics["value_loss"] = float(reduced[1])
            metrics["explained_variance"] = explained_variance_from_moments(reduced[3:8])
        metrics |= {
            "grad_norm": norm,
            "step_skipped": float(not ok),
            "_tokens": n_tokens,
        }
        metrics.update({k: float(v) for k, v in zip(stat_keys, reduced[8:])})
        return metrics

    # ------------------------------------------------------------------ loop
    def _stop_requested(self) -> bool:
        return 0 < self.config.run.max_steps <= self.state.step

    def _run_stage(self, name: str, total_steps: int) -> bool:
        """Run a stage to its end or to ``run.max_steps``; True when the stage finished."""
        step_fn = self._stage1_step if name == "stage1" else self._stage2_step
        every = self.config.checkpoint.every
        self.model.train()
        while self.state.stage_step < total_steps:
            if self._stop_requested():
                return False
            lr = self.scheduler.get_last_lr()[0]
            start = time.perf_counter()
            metrics = step_fn()
            elapsed = time.perf_counter() - start
            self.state.step += 1
            self.state.stage_step += 1
            tokens = metrics.pop("_tokens")
            self.state.tokens += int(tokens)
            metrics.update(
                {
                    "stage": 1.0 if name == "stage1" else 2.0,
                    "lr": lr,
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed,
                    "peak_memory_mb": peak_memory_mb(self.info.device),
                    "skipped_steps": float(self.state.skipped_steps),
                }
            )
            self.metrics_history.append({"step": float(self.state.step), **metrics})
            self.tracker.log_metrics(metrics, self.state.step)
            if self.state.stage_step % self.config.run.log_every == 0 or self.state.stage_step == total_steps:
                self._progress(name, total_steps, metrics)
            if every and self.state.step % every == 0:
                self.save_checkpoint()
        return True

    def _progress(self, name: str, total: int, m: dict[str, float]) -> None:
        parts = [f"[{name}] {self.state.stage_step}/{total} (step {self.state.step})"]
        for key, label in (
            ("total_loss", "loss"),
            ("mtp_loss", "mtp"),
            ("ce_head1", "ce1"),
            ("value_loss", "vloss"),
            ("explained_variance", "ev"),
            ("grad_norm", "gnorm"),
        ):
            if key in m:
                parts.append(f"{label} {m[key]:.4f}")
        parts.append(f"lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s")
        self.print("  ".join(parts))

    @torch.no_grad()
    def evaluate_value(self, dataset, label: str) -> float:
        """Explained variance of the critic on a fixed random subset of ``dataset`` (all ranks).

        Args:
            dataset: a :class:`~wmtp_train.data.dataset.LazyJsonlDataset`.
            label: metric name suffix.

        Returns:
            The explained variance over ``data.eval_batches`` batches per rank.
        """
        from wmtp_train.data.dataset import collate

        cfg = self.config
        size = cfg.stage1.micro_batch_size
        n = min(len(dataset), cfg.data.eval_batches * size * self.info.world_size)
        order = np.random.default_rng(cfg.run.seed + 7).permutation(len(dataset))[:n]
        mine = order[self.info.rank :: self.info.world_size]
        moments = torch.zeros(5, dtype=torch.float64)
        self.model.eval()
        for start in range(0, len(mine), size):
            samples = [dataset[int(i)] for i in mine[start : start + size]]
            batch = self._to_device(
                collate(samples, self.tokenizer.pad_id, cfg.data.padding_side, IGNORE_INDEX)
            )
            out = self.model.trunk_forward(batch["input_ids"], batch["attention_mask"])
            moments += ev_moments(out.values, batch["rewards"], batch["loss_mask"]).cpu()
        self._trunk_states.clear()
        self.model.train()
        ev = explained_variance_from_moments(_all_reduce_sum(moments, self.info.device))
        self.tracker.log_metrics({f"eval/{label}_explained_variance": ev}, self.state.step)
        self.print(f"eval: {label} explained variance {ev:.4f} ({int(moments[0])} tokens on rank 0)")
        return ev

    def _evaluate_all(self, stage: str) -> dict[str, float]:
        if self.config.data.eval_batches == 0:
            return {}
        out = {f"{stage}_train": self.evaluate_value(self.dataset, f"{stage}_train")}
        if self.heldout is not None:
            out[f"{stage}_heldout"] = self.evaluate_value(self.heldout, f"{stage}_heldout")
        return out

    def export(self) -> Path | None:
        """Gather the full model and write the consolidated Meta-format export (rank 0 writes).

        Returns:
            The export directory on rank 0, None elsewhere.
        """
        from wmtp_train.model.meta_checkpoint import export_meta_checkpoint

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        path = None
        if self.info.is_main:
            plain = build_model(self.model_args, device="meta")
            plain.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
            path = export_meta_checkpoint(plain, self.out / "export")
            self.print(f"export: {path}")
        dist.barrier()
        return path

    def fit(self) -> dict[str, Any]:
        """Run (or continue) every stage, checkpoint, export, and close tracking.

        Returns:
            ``{"steps", "finished", "evals", "history"}``.
        """
        cfg = self.config
        self.print(f"resolved config ({cfg.recipe}):\n{cfg.to_toml()}")
        status, evals, finished = "FAILED", {}, False
        try:
            if self.resume_from is not None:
                self._restore(self.resume_from)
            elif self.state.stage == "stage1":
                self._setup_stage1()
            else:
                self._setup_stage2()
            finished = True
            if self.state.stage == "stage1":
                finished = self._run_stage("stage1", cfg.stage1.steps)
                if finished:
                    evals.update(self._evaluate_all("stage1"))
                    self.state.stage, self.state.stage_step = "stage2", 0
                    self._setup_stage2()
            if finished:
                finished = self._run_stage("stage2", cfg.stage2.steps)
                if finished and cfg.stage2.value_coef > 0:
                    evals.update(self._evaluate_all("stage2"))
            ckpt = self.ckpt.step_dir(self.state.step)
            if self._last_saved != self.state.step:
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
