"""The loss benchmark of ``gpu_check.sh``: one fresh process per implementation, the floor timed in each.

    python benchmarks/gpu_bench.py --out DIR [--device cuda] [--dtype bfloat16] [--shape B,T,H,d,V ...]
        [--impls ours,ours-td,...] [--rounds 20] [--budget-s 330] [--note TEXT]

Each implementation runs in its own process over all shapes (``benchmarks/measure.py``): a warm-up step,
one step for ``max_memory_allocated``, then ``--rounds`` rounds of the implementation and the 3-GEMM
floor back to back (CUDA events). Writes ``DIR/RESULTS-cuda.md`` and ``DIR/results-cuda.json``. The
implementations run in priority order (ours first) and those that would start after ``--budget-s``
seconds are listed as skipped, so the whole check keeps to its time limit. ``--device cpu`` with a small
``--shape`` runs the same pipeline on a CPU (how the tests check it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.impls import CUDA_SHAPES, IMPLS, available  # noqa: E402
from benchmarks.measure import parse_shape, run_fresh  # noqa: E402
from benchmarks.results_table import environment, render, with_floor_rows  # noqa: E402
from benchmarks.timing import ratio_summary  # noqa: E402

# Priority order: if the time budget runs out, the last ones are skipped.
DEFAULT_IMPLS = ("ours", "ours-td", "compile", "liger", "cce", "naive", "liger-mean")


def summarise(raw: dict) -> dict:
    """A measure.py JSON row -> a results row (timing summary, memory, loss)."""
    row = {k: raw[k] for k in ("impl", "shape", "dtype", "extra_bytes", "loss")}
    row.update(ratio_summary(raw["times_s"], raw["floor_times_s"]))
    return row


def run_all(args) -> list[dict]:
    start = time.monotonic()
    rows: list[dict] = []
    for impl in args.impls:
        ok, why = available(impl, args.device)
        left = args.budget_s - (time.monotonic() - start)
        if ok and left <= 0:
            ok, why = False, f"time budget of {args.budget_s:.0f} s spent"
        if not ok:
            rows += [{"impl": impl, "shape": list(s), "skipped": why} for s in args.shape]
            print(f"{impl}: skipped ({why})", flush=True)
            continue
        t0 = time.monotonic()
        try:
            raw = run_fresh(impl, args.shape, args.dtype, args.device, rounds=args.rounds, timeout=left)
            rows += [summarise(r) for r in raw]
            status = "done"
        except subprocess.TimeoutExpired:
            rows += [
                {"impl": impl, "shape": list(s), "skipped": "ran past the time budget"} for s in args.shape
            ]
            status = "timed out"
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1][:200]
            rows += [{"impl": impl, "shape": list(s), "skipped": f"failed: {last}"} for s in args.shape]
            status = f"failed:\n{err}"
        print(f"{impl}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    return with_floor_rows(rows, IMPLS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, required=True, help="directory for RESULTS-cuda.md / results-cuda.json"
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shape", type=parse_shape, action="append", help=f"default: {CUDA_SHAPES}")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated, in priority order")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=330.0)
    p.add_argument("--note", default="", help="a line for the results header (e.g. the test summary)")
    args = p.parse_args(argv)
    args.shape = args.shape or [tuple(s) for s in CUDA_SHAPES]
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in args.impls if i not in IMPLS or i == "floor"]
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {[i for i in IMPLS if i != 'floor']}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    rows = run_all(args)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    title = f"Loss benchmark on {args.device.upper()}: weighted MTP loss, forward + backward, {args.dtype}"
    text = render(title, env, rows, [], args.note)
    (args.out / "RESULTS-cuda.md").write_text(text)
    (args.out / "results-cuda.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
