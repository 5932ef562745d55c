"""``fused_weighted_mtp_loss`` under ``torch.compile(fullgraph=True)`` against eager, forward + backward.

Each mode runs in a fresh process (``python benchmarks/bench_compile.py --mode eager|compiled ...``
prints one JSON line); the parent alternates the two modes ``--rounds`` times and reports the best
time of each and their ratio, plus the extra peak memory of one step (as ``benchmarks/measure.py``:
peak RSS beyond inputs and gradients on CPU, ``max_memory_allocated`` on CUDA).

The compiled function is the loss alone: the custom operator is opaque to the compiler, so what
changes is the Python wrapper (traced away) and the backward (the scaling of the stored gradients by
the incoming gradient, in place in eager, out of place in the compiled graph).

Run: ``python benchmarks/bench_compile.py [--shape B,T,H,d,V] [--dtype float32] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.impls import CPU_SHAPES, make_case  # noqa: E402
from benchmarks.measure import _reset_peak, _status_kib  # noqa: E402
from wmtp_kernels import fused_weighted_mtp_loss  # noqa: E402


def loss_fn(hidden, weight, labels, weights):
    return fused_weighted_mtp_loss(hidden, weight, labels, weights=weights)


def measure(mode: str, shape: tuple[int, ...], dtype: str, device: str, repeats: int) -> dict:
    """Best-of-``repeats`` time and extra peak memory of one forward + backward in ``mode``."""
    case = make_case(shape, getattr(torch, dtype), device)
    fn = torch.compile(loss_fn, fullgraph=True) if mode == "compiled" else loss_fn
    args = (case["hidden"], case["weight"], case["labels"], case["weights"])

    def step():
        case["hidden"].grad = case["weight"].grad = None
        fn(*args).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()  # warm-up: compiles in "compiled" mode
    first = time.perf_counter() - start
    grad_bytes = sum(case[k].numel() * case[k].element_size() for k in ("hidden", "weight"))
    case["hidden"].grad = case["weight"].grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        extra = torch.cuda.max_memory_allocated() - before - grad_bytes
    else:
        before = _status_kib("VmRSS") * 1024
        _reset_peak()
        step()
        extra = _status_kib("VmHWM") * 1024 - before - grad_bytes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "time_s": min(times), "times_s": times, "first_s": first, "extra_bytes": extra}


def run_fresh(mode: str, shape: str, dtype: str, device: str, repeats: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--shape", shape, "--dtype", dtype]
    cmd += ["--device", device, "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["eager", "compiled"], help="measure one mode (child process)")
    parser.add_argument("--shape", default=",".join(map(str, CPU_SHAPES[0])), help="B,T,H,d,V")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per mode, alternating")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.mode:
        print(json.dumps(measure(args.mode, shape, args.dtype, args.device, args.repeats)))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for mode in ("eager", "compiled"):
            result = run_fresh(mode, args.shape, args.dtype, args.device, args.repeats)
            if mode not in best or result["time_s"] < best[mode]["time_s"]:
                best[mode] = result
    eager, compiled = best["eager"], best["compiled"]
    print(f"shape {shape} {args.dtype} {args.device}, best of {args.rounds} x {args.repeats} steps")
    for r in (eager, compiled):
        print(
            f"  {r['mode']:8s} {r['time_s'] * 1e3:8.0f} ms   extra memory {r['extra_bytes'] / 2**20:7.0f} MiB"
            f"   first step {r['first_s']:.1f} s"
        )
    print(f"  compiled / eager time: {compiled['time_s'] / eager['time_s']:.3f}x")


if __name__ == "__main__":
    main()
