"""Benchmark collection (``bench_*.py``), a fresh-process runner and the RESULTS.md writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.results_table import render

HERE = Path(__file__).parent
RESULTS: list[dict] = []
SWEEP: list[dict] = []


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def run_fresh(impl: str, shape, dtype: str, device: str, chunk=None) -> dict:
    """Measure in a new Python process (see ``benchmarks/measure.py``); returns its JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        str(HERE / "measure.py"),
        impl,
        ",".join(map(str, shape)),
        dtype,
        device,
        str(chunk),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {shape} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def results():
    return RESULTS


@pytest.fixture
def sweep():
    return SWEEP


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS and not SWEEP:
        return
    target = Path(os.environ.get("WMTP_BENCH_RESULTS", HERE / "RESULTS.md"))
    note = os.environ.get("WMTP_BENCH_NOTE", "")
    target.write_text(render(RESULTS, SWEEP, note))
