"""Weighted MTP loss, forward + backward on the CPU: the peers, ours and the 3-GEMM floor.

    pytest benchmarks/bench_loss.py --benchmark-only [--bench-rounds 5] [--bench-curve] [--update-results]

Timing, in this one process: each implementation's rounds alternate with rounds of the floor (pytest-
benchmark times the implementation, the floor is timed in its ``setup``), so pytest-benchmark's table
shows the time of one forward + backward, and ``ratio`` (in ``extra_info`` and the summary printed at the
end) is the median of the per-round ratios to the floor, with its min-max. Memory: one fresh process per
implementation and shape (``benchmarks/measure.py``), ``extra_bytes`` beyond inputs and gradients.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.impls import CPU_SHAPES, IMPLS, available, clear_grads, floor_gemms, make_case, step
from benchmarks.measure import run_fresh
from benchmarks.timing import ratio_summary, time_call

SMALL_SHAPES = [(1, 64, 4, 128, 8000)]
CHUNKS = [64, 128, 256, 512, 1024]
DTYPE = "float32"
_CASES: dict[tuple, dict] = {}


def pytest_generate_tests(metafunc):
    shapes = SMALL_SHAPES if metafunc.config.getoption("--bench-shapes") == "small" else CPU_SHAPES
    ids = ["V" + str(s[-1]) + "-" + "x".join(map(str, s[:-1])) for s in shapes]
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", shapes, ids=ids)


def _case(shape) -> dict:
    if shape not in _CASES:
        _CASES.clear()  # one shape's tensors at a time
        _CASES[shape] = make_case(shape, getattr(torch, DTYPE), "cpu")
    return _CASES[shape]


def time_against_floor(benchmark, impl: str, case: dict, chunk: int | None, rounds: int) -> dict:
    """pytest-benchmark times ``impl``; the floor is timed in the setup of each round."""
    step(impl, case, chunk)  # warm-up: torch.compile, allocator
    floor_gemms(case)
    floor_times: list[float] = []

    def setup():
        clear_grads(case)
        floor_times.append(time_call(lambda: floor_gemms(case), "cpu"))

    benchmark.pedantic(step, args=(impl, case, chunk), setup=setup, rounds=rounds, iterations=1)
    if benchmark.disabled:
        pytest.skip("timing disabled (--benchmark-disable)")
    return ratio_summary(list(benchmark.stats.stats.data), floor_times)


def _measure(benchmark, request, record, impl, shape, chunk=None):
    ok, why = available(impl, "cpu")
    if not ok:
        record({"impl": impl, "shape": list(shape), "skipped": why})
        pytest.skip(why)
    row = {"impl": impl, "shape": list(shape), "chunk": chunk}
    row.update(
        time_against_floor(benchmark, impl, _case(shape), chunk, request.config.getoption("--bench-rounds"))
    )
    row.update(
        {
            k: v
            for k, v in run_fresh(impl, [shape], DTYPE, "cpu", chunk)[0].items()
            if k in ("extra_bytes", "loss")
        }
    )
    benchmark.extra_info.update(
        ratio_to_floor=round(row["ratio"], 3),
        ratio_range=f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}",
        extra_mib=round(row["extra_bytes"] / 2**20, 1),
    )
    record(row, curve=chunk is not None)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "floor"])
def test_loss(benchmark, request, record, impl, shape):
    _measure(benchmark, request, record, impl, shape)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunk_curve(benchmark, request, record, chunk, shape):
    config = request.config
    if not (config.getoption("--bench-curve") or config.getoption("--update-results")):
        pytest.skip("the chunk-size curve runs with --bench-curve or --update-results")
    _measure(benchmark, request, record, "ours", shape, chunk)
