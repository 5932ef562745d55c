"""Measure one implementation in a fresh process: its extra peak memory, and optionally its time.

    python benchmarks/measure.py IMPL --shape B,T,H,d,V [--shape ...] [--dtype float32] [--device cpu]
        [--chunk C] [--rounds R]

prints one JSON line per shape: ``extra_bytes`` (peak memory of one step beyond inputs and gradients),
``loss`` and, with ``--rounds R > 0``, ``times_s`` / ``floor_times_s``: R rounds of the implementation and
the 3-GEMM floor timed back to back (``benchmarks/timing.py``).

Memory on CPU: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) during one step minus
the RSS before it, minus the bytes of the gradients the step creates (hidden and W). glibc is told to
return large blocks at once (``MALLOC_MMAP_THRESHOLD_``, see :func:`run_fresh`) so that freed chunks do
not hide in its heap. CUDA: ``max_memory_allocated`` during the step minus the allocation before it,
minus the gradients. A warm-up step (``torch.compile``, autotuning, allocator) precedes the measured one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.impls import IMPLS, clear_grads, floor_gemms, make_case, step  # noqa: E402
from benchmarks.timing import interleaved_rounds  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes_of(run: Callable[[], Any], device: str) -> tuple[int, Any]:
    """Peak memory ``run()`` adds to what is allocated when it starts, and its result: peak RSS on the
    CPU (``VmHWM`` reset to the current RSS first), ``max_memory_allocated`` on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result
    before = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    result = run()
    return _status_kib("VmHWM") * 1024 - before, result


def extra_bytes_of_step(
    impl: str, case: dict, device: str, chunk_size: int | None
) -> tuple[int, float | None]:
    """Peak bytes of one step beyond inputs and gradients, and the step's loss."""
    grad_bytes = (
        0 if impl == "floor" else sum(case[k].numel() * case[k].element_size() for k in ("hidden", "weight"))
    )
    clear_grads(case)
    gc.collect()
    peak, loss = peak_bytes_of(lambda: step(impl, case, chunk_size), device)
    return peak - grad_bytes, None if loss is None else float(loss)


def measure(impl, shape, dtype, device, chunk_size=None, rounds=0) -> dict:
    """Warm-up, one memory-measured step, then ``rounds`` interleaved rounds against the floor."""
    case = make_case(shape, dtype, device)
    step(impl, case, chunk_size)
    extra, loss = extra_bytes_of_step(impl, case, device, chunk_size)
    dtype_name = str(dtype).removeprefix("torch.")
    result = {"impl": impl, "shape": list(shape), "dtype": dtype_name, "device": device, "chunk": chunk_size,
              "extra_bytes": extra, "loss": loss}  # fmt: skip
    if rounds:
        fns = {"impl": lambda: step(impl, case, chunk_size), "floor": lambda: floor_gemms(case)}
        times = interleaved_rounds(fns, rounds, device, before_each=lambda: clear_grads(case))
        result.update(times_s=times["impl"], floor_times_s=times["floor"])
    return result


def run_fresh(impl, shapes, dtype: str, device: str, chunk=None, rounds=0, timeout=None) -> list[dict]:
    """:func:`measure` in a new process (one JSON row per shape); raises with its stderr on failure."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), impl, "--dtype", dtype, "--device", device]
    cmd += [arg for s in shapes for arg in ("--shape", ",".join(map(str, s)))]
    cmd += ["--rounds", str(rounds)] + (["--chunk", str(chunk)] if chunk else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"B,T,H,d,V"`` -> a 5-tuple of ints (argparse type)."""
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be five positive ints B,T,H,d,V, got {text!r}")
    return parts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("impl", choices=IMPLS)
    p.add_argument("--shape", type=parse_shape, action="append", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chunk", type=int, default=None, help="chunk_size of ours (default: its own)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds against the floor (0: memory only)")
    args = p.parse_args(argv)
    for shape in args.shape:
        row = measure(args.impl, shape, getattr(torch, args.dtype), args.device, args.chunk, args.rounds)
        print(json.dumps(row), flush=True)
        gc.collect()  # the shape's tensors, before the next shape
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
