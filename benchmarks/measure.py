"""Measure one implementation in a fresh process: best-of-N time and extra peak memory.

Run as ``python benchmarks/measure.py IMPL B,T,H,d,V DTYPE DEVICE [CHUNK]``; prints one JSON line.

CPU memory: the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) during one step minus
the RSS before it, minus the bytes of the gradients the step creates (hidden and W): the memory
beyond inputs and gradients. glibc is told to return large blocks at once (``MALLOC_MMAP_THRESHOLD_``,
set by the parent) so that freed chunks do not hide in the heap. CUDA: ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.impls import make_case, step  # noqa: E402


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _clear_grads(case):
    case["hidden"].grad = None
    case["weight"].grad = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(impl, shape, dtype, device, chunk_size=None, repeats=3):
    """``{"time_s": best of repeats, "extra_bytes": peak beyond inputs and gradients}``."""
    case = make_case(shape, dtype, device)
    step(impl, case, chunk_size)  # warm-up (torch.compile, allocator)
    grad_bytes = sum(case[k].numel() * case[k].element_size() for k in ("hidden", "weight"))
    grad_bytes = 0 if impl == "floor" else grad_bytes
    _clear_grads(case)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(impl, case, chunk_size)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - grad_bytes
    else:
        before = _status_kib("VmRSS") * 1024
        _reset_peak()
        step(impl, case, chunk_size)
        extra = _status_kib("VmHWM") * 1024 - before - grad_bytes
    times = []
    for _ in range(repeats):
        _clear_grads(case)
        _sync(device)
        start = time.perf_counter()
        step(impl, case, chunk_size)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "times_s": times, "extra_bytes": extra}


if __name__ == "__main__":
    impl, shape_arg, dtype_arg, device_arg = sys.argv[1:5]
    chunk = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "None" else None
    shape = tuple(int(x) for x in shape_arg.split(","))
    print(json.dumps(measure(impl, shape, getattr(torch, dtype_arg), device_arg, chunk)))
