"""LoRA against full fine-tuning on the micro model, this CPU: stage-2 tokens/s, memory and checkpoint size.

Speed: one process builds both trainers (``baseline`` recipe, default HumanEval-verified data, stage 2)
and alternates their steps on identical batches, so both see the same load on a shared CPU; the figure is
the median of the per-pair time ratios (after ``--warmup`` pairs) and each side's median tokens/s.
Memory: each configuration then trains ``--steps`` steps in a fresh process of its own (peak RSS), which
also reports its trained parameters, the bytes of its training state (all parameters, plus gradients and
AdamW moments of the trained ones, from the tensors themselves) and the size on disk of its checkpoint.
Prints one JSON object.

    python benchmarks/bench_lora.py [--pairs N] [--steps N] [--rank R]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("full", "lora")


def make_trainer(lora: bool, rank: int, steps: int, out: str):
    """A ``baseline`` trainer of ``steps`` stage-2 steps, with or without LoRA of rank ``rank``."""
    from wmtp_train.config_files import load_recipe
    from wmtp_train.train.trainer import Trainer

    overrides = [
        f"run.out_dir={out}",
        f"stage2.steps={steps}",
        f"run.log_every={steps}",
        "checkpoint.every=0",
        "checkpoint.export=false",
        "tracking.enabled=false",
        f"lora.enabled={str(lora).lower()}",
        f"lora.rank={rank}",
        f"lora.alpha={2 * rank}",
    ]
    return Trainer(load_recipe("baseline", overrides))


def memory_worker(lora: bool, rank: int, steps: int, out: str) -> dict:
    """One training run in this (fresh) process; its memory figures."""
    trainer = make_trainer(lora, rank, steps, out)
    result = trainer.fit()
    stage = trainer.stages["stage2"]
    params = list(trainer.model.parameters())
    trained = [p for p in params if p.requires_grad]
    moments = sum(t.numel() * t.element_size() for s in stage.optimizer.state.values() for t in s.values())
    checkpoint = next((Path(out) / "checkpoints").iterdir())
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in params),
        "trained_parameters": sum(p.numel() for p in trained),
        "training_state_mib": (
            sum(p.numel() * p.element_size() for p in params)
            + sum(p.numel() * p.element_size() for p in trained)  # gradients
            + moments
        )
        / 2**20,
        "checkpoint_mib": sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**20,
        "final_mtp_loss": result["history"][-1]["mtp_loss"],
    }


def paired_speed(rank: int, pairs: int, warmup: int) -> dict:
    """Alternate full and LoRA stage-2 steps on the same batches in this process."""
    import torch

    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as out:
        stages, data = {}, None
        for name in CONFIGS:
            trainer = make_trainer(name == "lora", rank, pairs + warmup, f"{out}/{name}")
            stages[name], data = trainer.stage, trainer.data
            stages[name].setup(data.train.index)
        for pair in range(pairs + warmup):
            seconds = {}
            for name in CONFIGS:
                stage = stages[name]
                batches = [data.batch(indices) for indices in stage.next_indices()]
                start = time.perf_counter()
                tokens = stage.step(batches).tokens
                seconds[name] = time.perf_counter() - start
                if pair >= warmup:
                    rates[name].append(tokens / seconds[name])
            if pair >= warmup:
                ratios.append(seconds["full"] / seconds["lora"])
    return {
        "threads": torch.get_num_threads(),
        "pairs": pairs,
        "tokens_per_s_median": {name: round(statistics.median(rates[name])) for name in CONFIGS},
        "lora_speedup_median_of_pairs": round(statistics.median(ratios), 3),
        "lora_speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="timed full/LoRA step pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first")
    parser.add_argument("--steps", type=int, default=4, help="steps of each memory run")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args.worker == "lora", args.rank, args.steps, args.out)))
        return

    speed = paired_speed(args.rank, args.pairs, args.warmup)
    memory = {}
    for name in CONFIGS:
        with tempfile.TemporaryDirectory(prefix="bench_lora_") as out:
            cmd = [sys.executable, __file__, "--worker", name, "--out", out]
            cmd += ["--steps", str(args.steps), "--rank", str(args.rank)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "model": "micro",
        "recipe": "baseline",
        "lora_rank": args.rank,
        "speed": speed,
        "memory": {name: {k: round(v, 3) for k, v in figures.items()} for name, figures in memory.items()},
        "lora_over_full": {
            key: round(memory["lora"][key] / memory["full"][key], 3)
            for key in ("peak_rss_mib", "training_state_mib", "checkpoint_mib")
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
