"""End-to-end trainer benchmark: the ``verifiable`` recipe on the micro model, single process on this CPU.

Stage 1 then stage 2 on the default (HumanEval-verified) data, then, on the trained model and the same
stage-2 batches, tokens/s of the stage-2 step with ``fused_weighted_mtp_loss`` and with the plain PyTorch
reference loss, alternating A/B repeats. Prints one JSON object (device, versions, shapes, date, figures).

    python benchmarks/bench_train.py [--stage1-steps N] [--stage2-steps N] [--ab-steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--ab-steps", type=int, default=10, help="stage-2 steps per implementation")
    parser.add_argument("--ab-repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from wmtp_train.config import load_recipe
    from wmtp_train.train.trainer import Trainer

    out = args.out or tempfile.mkdtemp(prefix="bench_train_")
    cfg = load_recipe(
        "verifiable",
        [
            f"run.out_dir={out}",
            f"stage1.steps={args.stage1_steps}",
            f"stage2.steps={args.stage2_steps}",
            "run.log_every=50",
            "checkpoint.every=0",
            "tracking.enabled=false",
            "data.eval_batches=20",
        ],
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    wall = time.perf_counter() - start
    history = result["history"]

    def stage_rate(stage: float) -> dict[str, float]:
        rows = [h for h in history if h["stage"] == stage][1:]  # drop the warm-up step
        tokens = sum(h["tokens_per_s"] * h["step_time_s"] for h in rows)
        seconds = sum(h["step_time_s"] for h in rows)
        return {"steps": len(rows) + 1, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds)}

    # A/B on identical batches: rewind the curriculum sampler before each block of steps.
    stage = trainer.stages["stage2"]
    sampler = stage.sampler
    options = {
        impl: dataclasses.replace(stage.loss_options, implementation=impl) for impl in ("fused", "reference")
    }
    rates: dict[str, list[float]] = {"fused": [], "reference": []}
    for _ in range(args.ab_repeats):
        for impl in ("fused", "reference"):
            sampler.load_state_dict({"seed": sampler.seed, "epoch": 0, "position": 0})
            stage.loss_options = options[impl]
            tokens = seconds = 0.0
            for _ in range(args.ab_steps):
                t0 = time.perf_counter()
                done = stage.step([trainer.data.batch(indices) for indices in stage.next_indices()])
                seconds += time.perf_counter() - t0
                tokens += done.tokens
            rates[impl].append(tokens / seconds)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "micro",
        "dtype": "float32",
        "max_len": cfg.data.max_len,
        "stage1": {**stage_rate(1.0), "micro_batch": cfg.stage1.micro_batch_size},
        "stage2": {**stage_rate(2.0), "micro_batch": cfg.stage2.micro_batch_size},
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "explained_variance": {k: round(v, 4) for k, v in result["evals"].items()},
        "stage2_tokens_per_s_fused": round(max(rates["fused"])),
        "stage2_tokens_per_s_reference": round(max(rates["reference"])),
        "fused_speedup": round(max(rates["fused"]) / max(rates["reference"]), 3),
        "final_mtp_loss": round(history[-1]["mtp_loss"], 4),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
