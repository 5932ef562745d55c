"""CUDA: the fused loss at several chunk sizes against the floor, and a kernel-time profile of one step.

    python benchmarks/prototypes/cuda_chunk_sweep.py --out DIR [--rounds 10]

Prints one line per (shape, chunk): median time, median ratio to the 3-GEMM floor timed in the same
rounds, and the extra memory of one step (``benchmarks/measure.py``'s definition); writes the profile
of one default step per shape (CUDA kernels by total time) to ``DIR/profile-<V>.txt``. The numbers chose
the CUDA default chunk budget (``wmtp_kernels/_linear_pass.py``; ``benchmarks/KERNEL_NOTES.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.impls import CUDA_SHAPES, clear_grads, make_case, step  # noqa: E402
from benchmarks.measure import measure  # noqa: E402
from benchmarks.timing import ratio_summary  # noqa: E402

CHUNKS = {32000: [None, 1024, 3072, 4096, 8192], 128256: [None, 1024, 1536, 2048, 4096]}


def profile(shape, out_dir):
    case = make_case(shape, torch.bfloat16, "cuda")
    step("ours", case)
    clear_grads(case)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step("ours", case)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=70)
    with open(os.path.join(out_dir, f"profile-{shape[-1]}.txt"), "w") as f:
        f.write(table)
    print(table[:3000], flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    rows = []
    for shape in CUDA_SHAPES:
        for chunk in CHUNKS[shape[-1]]:
            r = measure("ours", shape, torch.bfloat16, "cuda", chunk_size=chunk, rounds=args.rounds)
            r.update(ratio_summary(r.pop("times_s"), r.pop("floor_times_s")))
            rows.append(r)
            print(f"V={shape[-1]} chunk={chunk} time={r['time_s'] * 1e3:.1f} ms ratio={r['ratio']:.3f} "
                  f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) extra={r['extra_bytes'] / 2**20:.0f} MiB",
                  flush=True)  # fmt: skip
            torch.cuda.empty_cache()
        profile(shape, args.out)
    with open(os.path.join(args.out, "chunk-sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
