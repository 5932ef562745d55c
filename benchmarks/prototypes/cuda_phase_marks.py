"""When the host and the device reach each phase of one step of the fused loss (CUDA).

    python benchmarks/prototypes/cuda_phase_marks.py [--rounds 10] [--impls ours,ours-td] [--device cuda]
                                                     [--with-floor]

The loss's phases (entry of ``fused_weighted_mtp_loss``, the custom operator's body, the row plan with
its one synchronisation, the chunk loop, the outputs; backward follows the API's return) are wrapped so
that each records ``time.perf_counter()`` and a CUDA event as it starts. Per phase: the host's time since
the step began and the device's (event) time, medians over rounds. Where the device's time equals the
host's, the device was waiting for the host to launch work; the phase-to-phase differences say which
phase costs the time.
``--device cpu`` runs the same code at a small shape (a smoke test; device times are then host times).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import benchmarks.impls as impls  # noqa: E402
from wmtp_kernels import _autograd, _linear_op  # noqa: E402

SMALL_SHAPE = (1, 64, 4, 64, 512)
MARKS: list[tuple[str, float, object]] = []


def mark(name: str, device: str) -> None:
    event = None
    if device == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
    MARKS.append((name, time.perf_counter(), event))


def wrap(module, attr: str, name: str, device: str) -> None:
    original = getattr(module, attr)

    @functools.wraps(original)
    def marked(*args, **kwargs):
        mark(name, device)
        out = original(*args, **kwargs)
        mark(name + " done", device)
        return out

    setattr(module, attr, marked)


def instrument(device: str) -> None:
    wrap(impls, "fused_weighted_mtp_loss", "api", device)
    wrap(_linear_op, "forward", "op body", device)
    wrap(_linear_op, "_kernel_plan", "plan (row kernels)", device)
    wrap(_linear_op, "_torch_plan", "plan (torch ops)", device)
    wrap(_linear_op, "linear_pass", "chunk loop", device)
    wrap(_autograd, "forward_outputs", "outputs", device)
    wrap(_autograd, "backward", "backward", device)


def one_round(impl: str, case: dict, device: str, with_floor: bool = False) -> list[tuple[str, float, float]]:
    if with_floor:  # as the benchmark's rounds alternate with the floor (untimed here)
        impls.step("floor", case)
    impls.clear_grads(case)
    if device == "cuda":
        torch.cuda.synchronize()
    MARKS.clear()
    mark("start", device)
    impls.step(impl, case)
    mark("end", device)
    if device == "cuda":
        torch.cuda.synchronize()
    _, host0, event0 = MARKS[0]
    rows = []
    for name, host, event in MARKS:
        dev = event0.elapsed_time(event) / 1e3 if device == "cuda" else host - host0
        rows.append((name, host - host0, dev))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--impls", default="ours,ours-td")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--with-floor", action="store_true", help="run the floor (untimed) before each round")
    args = p.parse_args()
    instrument(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shapes = impls.CUDA_SHAPES if args.device == "cuda" else [SMALL_SHAPE]
    for shape in shapes:
        case = impls.make_case(shape, dtype, args.device)
        for impl in args.impls.split(","):
            for _ in range(3):
                one_round(impl, case, args.device, args.with_floor)
            runs = [one_round(impl, case, args.device, args.with_floor) for _ in range(args.rounds)]
            print(f"== V={shape[-1]} {impl}: ms since the step began (median of {args.rounds})")
            print(f"  {'phase':<20} {'host':>8} {'device':>8}")
            for i, (name, _, _) in enumerate(runs[0]):
                host = statistics.median(r[i][1] for r in runs) * 1e3
                dev = statistics.median(r[i][2] for r in runs) * 1e3
                print(f"  {name:<20} {host:8.3f} {dev:8.3f}")
            sys.stdout.flush()
        del case
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
