"""``fused_weighted_mtp_loss`` under ``torch.compile(fullgraph=True)`` against eager, forward + backward.

Time: two persistent worker processes (eager and compiled) are warmed up, then the parent asks them for
one step each in alternation (ABBA order) ``--steps`` times; the result is the median of the per-pair
ratios, so a load swing on a shared machine hits both sides of a pair alike. Memory: one fresh process
per mode, extra peak beyond inputs and gradients as ``benchmarks/measure.py`` measures it (peak RSS on
CPU, ``max_memory_allocated`` on CUDA).

The compiled function is the loss alone: the custom operator is opaque to the compiler, so what changes
is the Python wrapper (traced away) and the backward (the stored gradients are scaled by the incoming
gradient in place in eager, out of place in the compiled graph). ``--baseline DIR`` instead compares
eager here against eager in another checkout ``DIR`` (e.g. a ``git worktree`` of an older commit).

Run: ``python benchmarks/bench_compile.py [--shape B,T,H,d,V] [--dtype float32] [--steps 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # after PYTHONPATH, so that a --baseline worker imports the other checkout

import torch  # noqa: E402

from benchmarks.impls import CPU_SHAPES, make_case  # noqa: E402
from benchmarks.measure import peak_bytes_of  # noqa: E402


def make_step(mode: str, shape: tuple[int, ...], dtype: str, device: str):
    """The inputs of one case and a closure running one forward + backward in ``mode``."""
    from wmtp_kernels import fused_weighted_mtp_loss

    def loss_fn(hidden, weight, labels, weights):
        return fused_weighted_mtp_loss(hidden, weight, labels, weights=weights)

    case = make_case(shape, getattr(torch, dtype), device)
    fn = torch.compile(loss_fn, fullgraph=True) if mode == "compiled" else loss_fn
    args = (case["hidden"], case["weight"], case["labels"], case["weights"])

    def step():
        case["hidden"].grad = case["weight"].grad = None
        fn(*args).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return case, step


def measure_memory(mode: str, shape: tuple[int, ...], dtype: str, device: str) -> dict:
    """Extra peak memory of one step after a warm-up (which also times the compilation)."""
    case, step = make_step(mode, shape, dtype, device)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    grad_bytes = sum(case[k].numel() * case[k].element_size() for k in ("hidden", "weight"))
    case["hidden"].grad = case["weight"].grad = None
    peak, _ = peak_bytes_of(step, device)
    extra = peak - grad_bytes
    return {"mode": mode, "extra_bytes": extra, "first_step_s": first}


def serve(mode: str, shape: tuple[int, ...], dtype: str, device: str) -> None:
    """Worker: warm up, print ``ready``, then time one step per line read from stdin."""
    _, step = make_step(mode, shape, dtype, device)
    step()
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)


def _child(args: argparse.Namespace, *extra: str) -> list[str]:
    script = os.path.abspath(__file__)
    shape = ",".join(map(str, args.shape))
    return [sys.executable, script, "--shape", shape, "--dtype", args.dtype, "--device", args.device, *extra]


def _env(tree: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=tree, MALLOC_MMAP_THRESHOLD_="65536")


def paired_times(workers: dict[str, tuple[list[str], str]], steps: int) -> dict[str, list[float]]:
    """Per-step times of each worker, asked in alternation (A B, B A, A B, ...)."""
    procs = {
        label: subprocess.Popen(cmd, env=_env(tree), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for label, (cmd, tree) in workers.items()
    }
    try:
        for label, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"worker {label} failed to start")
        times: dict[str, list[float]] = {label: [] for label in procs}
        labels = list(procs)
        for i in range(steps):
            for label in labels if i % 2 == 0 else labels[::-1]:
                procs[label].stdin.write("\n")
                procs[label].stdin.flush()
                times[label].append(float(procs[label].stdout.readline()))
        return times
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=",".join(map(str, CPU_SHAPES[0])), help="B,T,H,d,V")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    parser.add_argument("--baseline", help="compare eager here with eager in this other checkout")
    parser.add_argument("--serve", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    parser.add_argument("--memory", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = tuple(int(x) for x in args.shape.split(","))
    if args.serve:
        serve(args.serve, args.shape, args.dtype, args.device)
        return
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.shape, args.dtype, args.device)))
        return
    if args.baseline:
        baseline = os.path.abspath(args.baseline)
        workers = {
            "baseline eager": (_child(args, "--serve", "eager"), baseline),
            "eager": (_child(args, "--serve", "eager"), ROOT),
        }
    else:
        workers = {mode: (_child(args, "--serve", mode), ROOT) for mode in ("eager", "compiled")}
    times = paired_times(workers, args.steps)
    (label_a, a), (label_b, b) = times.items()
    ratio = statistics.median(y / x for x, y in zip(a, b))
    print(f"shape {args.shape} {args.dtype} {args.device}, {args.steps} alternating steps per side")
    for label, t in times.items():
        line = f"  {label:15s} median {statistics.median(t) * 1e3:7.0f} ms, best {min(t) * 1e3:7.0f} ms"
        if not args.baseline:
            cmd = _child(args, "--memory", label)
            memory = json.loads(subprocess.run(cmd, env=_env(ROOT), capture_output=True, text=True).stdout)
            line += f", extra memory {memory['extra_bytes'] / 2**20:5.0f} MiB"
        print(line)
    print(f"  {label_b} / {label_a} time, median of paired ratios: {ratio:.3f}x")


if __name__ == "__main__":
    main()
