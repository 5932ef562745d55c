"""One real training step at the 7B width on a GPU against the memory estimator's prediction.

The model is ``7b_1t_4`` cut to ``--layers`` blocks (default 5: one trunk block and the four head blocks,
the MTP-specific part, with the full 32000 x 4096 unembedding and the fused loss), bf16 parameters with
fp32 gradient reduction, FSDP2 on a one-rank nccl group. The ``verifiable`` recipe's two stages, two steps
each, at ``--batch`` x ``--seq`` tokens. For each stage it prints ``torch.cuda.max_memory_allocated`` of the
real steps next to ``--estimate-memory``'s prediction for the same configuration (computed first, on fake
tensors), and exits 1 when they differ by more than 10 %.

    python benchmarks/gpu_7b_step.py [--layers 5] [--batch 2] [--seq 2048] [--checkpointing none]
    python benchmarks/gpu_7b_step.py --dry-run   # the same path on the CPU (gloo, micro-sized), for tests

Without CUDA (and without ``--dry-run``) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TOLERANCE = 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=5, help="blocks of the 7B shape (>= 4 heads + 1)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU at the micro width (tests)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_7b_step: skipped (no CUDA device); run it on a GPU machine")
        return 0

    from wmtp_train.config_files import load_recipe
    from wmtp_train.model.args import PRESETS
    from wmtp_train.train import memory
    from wmtp_train.train.parallelize import init_distributed

    base = "micro" if args.dry_run else "7b_1t_4"
    preset = f"{base}_{args.layers}_layers"
    PRESETS[preset] = dataclasses.replace(PRESETS[base], n_layers=args.layers)
    device = "cpu" if args.dry_run else "cuda"
    config = load_recipe(
        "verifiable",
        [
            f"model.preset={preset}",
            f"run.device={device}",
            f"data.max_len={args.seq}",
            f"parallel.activation_checkpoint={args.checkpointing}",
            f"stage1.micro_batch_size={args.batch}",
            f"stage2.micro_batch_size={args.batch}",
        ],
    )
    estimated = memory.estimate_memory(config, world_size=1, device_type=device)
    info = init_distributed(device)
    try:
        measured = memory.measure_memory(config, info)
    finally:
        torch.distributed.destroy_process_group()
    # The tracker's own breakdown of the real run is not shown: on CUDA it over-counts (its stage-2 peak
    # came out above the allocator's); the allocator's peak is the measurement.
    compared = [dataclasses.replace(e, measured=m.measured) for e, m in zip(estimated, measured)]
    print(memory.format_report(compared, config, 1, device))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    parts, ok = [], True
    for est, real in zip(estimated, measured):
        ratio = est.peak / real.measured
        ok &= abs(ratio - 1) <= TOLERANCE
        mib = (est.peak / 2**20, real.measured / 2**20)
        parts.append(f"{est.stage} estimate {mib[0]:.0f} MiB, measured {mib[1]:.0f} MiB ({ratio:.3f})")
    verdict = "within" if ok else "NOT within"
    print(f"gpu_7b_step: {preset}, {args.batch} x {args.seq}, {name}: {'; '.join(parts)}; {verdict} 10 %")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
