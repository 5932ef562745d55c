"""Weighted MTP loss, forward + backward: peers, ours and the 3-GEMM floor, one fresh process each.

``pytest benchmarks --benchmark-only`` (the CPU shapes take a few minutes on 2 cores). Results go to
``benchmarks/RESULTS.md``; ``WMTP_BENCH_SHAPES=small`` runs a tiny smoke shape instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.conftest import run_fresh
from benchmarks.impls import CPU_SHAPES, CUDA_SHAPES, IMPLS, available

SMOKE = os.environ.get("WMTP_BENCH_SHAPES") == "small"
CPU = [(1, 64, 4, 128, 8000)] if SMOKE else CPU_SHAPES
CASES = [(s, "float32", "cpu") for s in CPU] + [(s, "bfloat16", "cuda") for s in CUDA_SHAPES]
CHUNKS = [64, 128, 256, 512, 1024]


def _skip_without_cuda(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, dtype, device", CASES, ids=[f"{d}-{s}" for s, _, d in CASES])
def test_loss(benchmark, results, impl, shape, dtype, device):
    _skip_without_cuda(device)
    ok, why = available(impl, device)
    if not ok:
        results.append({"shape": shape, "dtype": dtype, "impl": impl, "skipped": why})
        pytest.skip(why)
    measured = benchmark.pedantic(run_fresh, args=(impl, shape, dtype, device), rounds=1, iterations=1)
    benchmark.extra_info.update(measured)
    results.append({"shape": shape, "dtype": dtype, "impl": impl, **measured})


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunk_sweep(benchmark, sweep, chunk):
    shape = CPU[0]
    measured = benchmark.pedantic(
        run_fresh, args=("ours", shape, "float32", "cpu", chunk), rounds=1, iterations=1
    )
    benchmark.extra_info.update(measured)
    sweep.append({"shape": shape, "chunk": chunk, **measured})
