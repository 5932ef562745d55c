"""Validate ``--estimate-memory`` against the measured peak of a real 2-rank gloo run on this CPU.

For each configuration (preset, activation checkpointing, micro-batch), runs the estimator (fake tensors,
fake process group of 2 ranks) and ``torchrun --nproc_per_node=2 -m wmtp_train --measure-memory`` (the
same two steps per stage on real tensors; the CPU allocator's peak, worst rank), and prints one Markdown
row per stage: estimate, measurement (MiB) and their ratio. The ``verifiable`` recipe, sequences of
``--seq`` tokens.

    python benchmarks/validate_memory.py [--presets micro small] [--batches 4 8] [--seq 384]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def run_cli(args: list[str], nproc: int | None = None) -> str:
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*launcher, "-m", "wmtp_train", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return proc.stdout


def row(report: str, label: str) -> list[float]:
    line = next(line for line in report.splitlines() if line.startswith(label))
    return [float(x) for x in line[len(label) :].split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["micro", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: micro 4 8, small 2 4")
    parser.add_argument("--checkpointing", nargs="+", default=["none", "full"])
    parser.add_argument("--seq", type=int, default=384)
    args = parser.parse_args()
    columns = ["preset", "checkpointing", "micro-batch", "stage", "estimate (MiB)", "measured (MiB)"]
    print("| " + " | ".join([*columns, "estimate / measured"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    default_batches = {"micro": [4, 8], "small": [2, 4]}
    for preset in args.presets:
        for mode in args.checkpointing:
            for batch in args.batches or default_batches.get(preset, [2]):
                cli = ["--recipe", "verifiable", "--preset", preset]
                for key, value in (
                    ("run.device", "cpu"),
                    ("data.max_len", args.seq),
                    ("parallel.activation_checkpoint", mode),
                    ("stage1.micro_batch_size", batch),
                    ("stage2.micro_batch_size", batch),
                ):
                    cli += ["--set", f"{key}={value}"]
                start = time.perf_counter()
                estimated = row(run_cli([*cli, "--estimate-memory", "--world-size", "2"]), "estimated peak")
                seconds = time.perf_counter() - start
                measured = row(run_cli([*cli, "--measure-memory"], nproc=2), "measured peak (allocator)")
                for stage, est, real in zip(("stage1", "stage2"), estimated, measured):
                    print(
                        f"| {preset} | {mode} | {batch} x {args.seq} | {stage} | {est:.1f} | {real:.1f} "
                        f"| {est / real:.3f} |",
                        flush=True,
                    )
                print(f"<!-- estimator wall time {seconds:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
