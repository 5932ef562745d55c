"""The "Planning a 7B run" table of the README: ``--estimate-memory`` over a grid of 7b_1t_4 runs on CUDA.

For every world size, sequence length, micro-batch and activation checkpointing mode, the per-rank peak of
stage 1 and stage 2 of the ``verifiable`` recipe (bf16 parameters, fp32 gradient reduction, FSDP2), and
whether it fits an 80 GB H100 with 10 % headroom. Prints a Markdown table (one row per estimate, as it
finishes), then the model FLOPs per token. Each estimate takes about a minute on a laptop-class CPU.

    python benchmarks/plan_7b.py [--worlds 8 16] [--seqs 2048 4096] [--batches 1 2 4] \
        [--checkpointing none full]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2**30
BUDGET = 0.9 * 80e9
"""80 GB (80 * 10^9 bytes; an H100 80GB has 81,559 MiB, the rest goes to the CUDA context and NCCL) less
10 % headroom."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--seqs", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--checkpointing", nargs="+", default=["none", "full"])
    args = parser.parse_args()

    from wmtp_train.config_files import load_recipe
    from wmtp_train.model import resolve_args
    from wmtp_train.train.flops import flops_per_token
    from wmtp_train.train.memory import estimate_memory

    def fits(peak: int) -> str:
        return "yes" if peak <= BUDGET else "no"

    columns = ["world", "seq", "micro-batch", "checkpointing", "stage 1 peak (GiB)", "stage 2 peak (GiB)"]
    print("| " + " | ".join([*columns, "fits: stage 1 / 2"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    grid = itertools.product(args.worlds, args.seqs, args.checkpointing, args.batches)
    for world, seq, mode, batch in grid:
        overrides = [
            "model.preset=7b_1t_4",
            f"data.max_len={seq}",
            f"parallel.activation_checkpoint={mode}",
            f"stage1.micro_batch_size={batch}",
            f"stage2.micro_batch_size={batch}",
        ]
        start = time.perf_counter()
        stage1, stage2 = estimate_memory(load_recipe("verifiable", overrides), world, "cuda")
        seconds = time.perf_counter() - start
        print(
            f"| {world} | {seq} | {batch} | {mode} | {stage1.peak / GIB:.1f} | {stage2.peak / GIB:.1f} "
            f"| {fits(stage1.peak)} / {fits(stage2.peak)} |  <!-- {seconds:.0f} s -->",
            flush=True,
        )
    model = resolve_args("7b_1t_4")
    for seq in args.seqs:
        stage1, stage2 = (flops_per_token(model, seq, stage) / 1e9 for stage in ("stage1", "stage2"))
        print(f"FLOPs per token at {seq}: stage 1 {stage1:.1f} G, stage 2 {stage2:.1f} G")


if __name__ == "__main__":
    main()
