"""The trainer runs of a comparison, one ``python -m wmtp_train`` process at a time, and the record of
each finished phase (``phase.json``: wall-clock time and command), which lets an interrupted comparison
continue where it stopped.

Every run of a seed uses ``run.seed`` = the seed, so the base model's initialisation and every sampler
follow it; stage 2 of the recipes that sample all training records (``baseline``, ``verifiable``,
``rho1_weighted``) then draws the same records in the same order (same seed, batch size and steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp_train.experiment.protocol import Protocol

PHASE_FILE = "phase.json"
_LOG_TAIL = 3000


@dataclass(frozen=True)
class TrainerRun:
    """One ``python -m wmtp_train`` invocation.

    Attributes:
        recipe: the recipe file's name.
        out: the run directory.
        data: training JSONL.
        start: a Meta-format checkpoint directory to start from, or None for the preset's fresh init.
        overrides: ``section.key=value`` settings.
        max_steps: stop after this many steps (0: run every stage).
    """

    recipe: str
    out: Path
    data: Path
    start: Path | None
    overrides: tuple[str, ...]
    max_steps: int = 0

    def command(self, preset: str) -> list[str]:
        """The command line."""
        cmd = [sys.executable, "-m", "wmtp_train", "--recipe", self.recipe, "--out", str(self.out)]
        cmd += ["--data", str(self.data)]
        cmd += ["--checkpoint-dir", str(self.start)] if self.start else ["--preset", preset]
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd


def common_overrides(seed: int, threads: int, mixed_precision: str) -> tuple[str, ...]:
    """Settings every run of a comparison shares: seed, threads, precision, no MLflow, one checkpoint."""
    return (
        f"run.seed={seed}",
        f"run.threads={threads}",
        f"parallel.mixed_precision={mixed_precision}",
        "run.log_every=25",
        "tracking.enabled=false",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        "data.eval_batches=0",
    )


def stage2_overrides(protocol: Protocol, steps: int, lr: float, micro_batch_size: int) -> tuple[str, ...]:
    """Stage-2 optimiser settings: the same for every recipe, the base's with its own lr and batch size."""
    return (
        f"stage2.steps={steps}",
        f"stage2.micro_batch_size={micro_batch_size}",
        "stage2.grad_accum=1",
        f"stage2.lr={lr}",
        f"stage2.warmup_steps={min(protocol.warmup_steps, max(steps - 1, 0))}",
        f"stage2.length_window={protocol.length_window}",
    )


def critic_overrides(protocol: Protocol) -> tuple[str, ...]:
    """Stage-1 settings of ``verifiable``'s critic (its value head kind included)."""
    return (
        "stage1.enabled=true",
        "stage1.cache_trunk_states=true",
        f"stage1.sampler={protocol.critic_sampler}",
        f"model.value_head={protocol.critic_value_head}",
        f"stage1.steps={protocol.critic_steps}",
        f"stage1.micro_batch_size={protocol.critic_micro_batch_size}",
        f"stage1.lr={protocol.critic_lr}",
        f"stage1.warmup_steps={min(10, protocol.critic_steps - 1)}",
    )


def phase_done(directory: Path) -> dict[str, Any] | None:
    """The record of a finished phase in ``directory``, or None."""
    path = directory / PHASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_phase(
    directory: Path, name: str, work: Callable[[], dict[str, Any]], log: Callable[[str], None]
) -> dict:
    """Run ``work`` unless ``directory`` records it finished; record its wall time and result.

    Args:
        directory: the phase's directory (created).
        name: what is printed.
        work: does the phase; returns what to record.
        log: progress printer.

    Returns:
        The phase record: ``work``'s result plus ``wall_s``.
    """
    done = phase_done(directory)
    if done is not None:
        log(f"{name}: done before ({done['wall_s']:.0f} s), skipped")
        return done
    directory.mkdir(parents=True, exist_ok=True)
    log(f"{name} ...")
    start = time.monotonic()
    record = work()
    record["wall_s"] = time.monotonic() - start
    record["load_average"] = os.getloadavg()[0]  # over the last minute of the phase
    tmp = directory / (PHASE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, directory / PHASE_FILE)
    log(f"{name}: {record['wall_s']:.0f} s")
    return record


def train(run: TrainerRun, preset: str) -> dict[str, Any]:
    """Run the trainer to the end (its console output in ``<out>/train.log``).

    Args:
        run: the invocation.
        preset: model preset when the run does not start from a checkpoint.

    Returns:
        ``{"command": [...]}``.

    Raises:
        RuntimeError: the trainer failed (with the end of its log).
    """
    run.out.mkdir(parents=True, exist_ok=True)
    command = run.command(preset)
    with open(run.out / "train.log", "w") as log_file:
        status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    if status.returncode != 0:
        tail = (run.out / "train.log").read_text()[-_LOG_TAIL:]
        raise RuntimeError(f"trainer failed ({status.returncode}): {' '.join(command)}\n{tail}")
    return {"command": command}


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The per-step records of a run's ``metrics.jsonl`` (parameters and evaluations left out)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "step" in record and "stage" in record]
