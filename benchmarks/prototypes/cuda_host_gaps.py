"""Where the fused loss's step waits on the host: synchronising calls, host vs device time, idle gaps.

    python benchmarks/prototypes/cuda_host_gaps.py [--rounds 10] [--device cuda]

Per shape (``benchmarks/impls.py``'s CUDA shapes), for ``ours`` and the floor:
1. every synchronising CUDA call of one step, with its Python call site
   (``torch.cuda.set_sync_debug_mode("warn")``);
2. per round: host time (until the step's Python call returns), device time (CUDA events around the
   step) and the device's busy time (sum of kernel durations from the profiler), medians;
3. the largest idle gaps between consecutive kernels of one profiled step, and the kernel after each.
``--device cpu`` runs the same code at a small shape (a smoke test of the script; no sync analysis).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.impls import CUDA_SHAPES, clear_grads, make_case, step  # noqa: E402

SMALL_SHAPE = (1, 64, 4, 64, 512)


def sync_sites(impl, case):
    """Call sites (innermost project frame) of the synchronising CUDA calls of one step."""
    sites: list[str] = []
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/wmtp_kernels/" in f.filename]
        where = frames[-1] if frames else traceback.extract_stack()[-2]
        sites.append(f"{os.path.basename(where.filename)}:{where.lineno} {where.line}")

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(impl, case)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = original
    return sites


def host_device_times(impl, case, rounds, device):
    host, dev = [], []
    for _ in range(rounds):
        clear_grads(case)
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step(impl, case)
        host.append(time.perf_counter() - t0)
        if device == "cuda":
            end.record()
            end.synchronize()
            dev.append(start.elapsed_time(end) / 1e3)
    return statistics.median(host), (statistics.median(dev) if dev else float("nan"))


def kernel_timeline(impl, case, device):
    clear_grads(case)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        step(impl, case)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted(
        (e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    averages = prof.key_averages()
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    return kernels, cpu_table


def report_timeline(kernels):
    if not kernels:
        print("  (no device kernels recorded)")
        return
    busy = sum(k.time_range.elapsed_us() for k in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    gaps = []
    for before, after in zip(kernels, kernels[1:]):
        gaps.append((after.time_range.start - before.time_range.end, before.name[:50], after.name[:50]))
    gaps.sort(reverse=True)
    print(f"  {len(kernels)} kernels, busy {busy / 1e3:.2f} ms over a span of {span / 1e3:.2f} ms; "
          f"idle between kernels {sum(g for g, _, _ in gaps if g > 0) / 1e3:.2f} ms")  # fmt: skip
    for gap, before, after in gaps[:8]:
        print(f"  gap {gap / 1e3:7.3f} ms  after {before!r}  before {after!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shapes = CUDA_SHAPES if args.device == "cuda" else [SMALL_SHAPE]
    for shape in shapes:
        case = make_case(shape, dtype, args.device)
        for impl in ("ours", "floor"):
            for _ in range(3):
                clear_grads(case)
                step(impl, case)
            print(f"== V={shape[-1]} {impl}", flush=True)
            if args.device == "cuda":
                clear_grads(case)
                sites = sync_sites(impl, case)
                print(f"  {len(sites)} synchronising calls in one step:")
                for site in dict.fromkeys(sites):
                    print(f"    {sites.count(site)} x {site}")
            host, dev = host_device_times(impl, case, args.rounds, args.device)
            print(f"  median host time {host * 1e3:.2f} ms, device time (events) {dev * 1e3:.2f} ms")
            kernels, cpu_table = kernel_timeline(impl, case, args.device)
            report_timeline(kernels)
            if impl == "ours":
                print(cpu_table, flush=True)
        del case
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
