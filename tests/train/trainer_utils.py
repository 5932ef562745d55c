"""Shared helpers of the trainer tests: a tiny JSONL data set and tiny recipe configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from wmtp_train.config import TrainConfig
from wmtp_train.config_files import load_recipe


def write_tiny_jsonl(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Records with short prompts/completions, half correct, difficulties 1..11."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a = rng.randint(0, 9)
            correct = i % 2 == 0
            completion = f"    return x + {a}\n" if correct else f"    return x * {a} - 1\n"
            record = {
                "task_id": f"t{i // 4}",
                "prompt": f"def f{i}(x):\n",
                "completion": completion,
                "is_correct": correct,
                "difficulty": 1 + i % 11,
            }
            f.write(json.dumps(record) + "\n")
    return path


def tiny_overrides(out: Path, data: Path, **extra) -> list[str]:
    """``--set`` strings for a seconds-long run on the micro model."""
    base = {
        "run.out_dir": str(out),
        "run.threads": 1,
        "data.path": str(data),
        "data.max_len": 40,
        "data.eval_batches": 1,
        "stage1.steps": 3,
        "stage1.micro_batch_size": 4,
        "stage1.warmup_steps": 1,
        "stage2.steps": 4,
        "stage2.micro_batch_size": 2,
        "stage2.grad_accum": 2,
        "stage2.warmup_steps": 1,
        "stage2.value_snapshot_every": 2,
        "checkpoint.every": 2,
        "checkpoint.export": False,
        "tracking.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_config(recipe: str, out: Path, data: Path, **extra) -> TrainConfig:
    """A shipped recipe shrunk by :func:`tiny_overrides` (keys as ``section.key``)."""
    return load_recipe(recipe, tiny_overrides(out, data, **extra))
