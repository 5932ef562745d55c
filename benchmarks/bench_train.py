"""The loss inside a real training step: stage-2 A/B of the fused loss, the reference and a compiled one.

    python benchmarks/bench_train.py [--preset small] [--recipe baseline] [--steps 6] [--micro-batch 4]
        [--impls fused,reference,compile] [--repeats 1] [--warmup 2] [--set SECTION.KEY=VALUE ...]
        [--json FILE]

Each implementation trains in its own ``python -m wmtp_train`` process from the same seed, so every run
sees the same batches, with the trainer's switch ``--set stage2.loss_impl=fused|reference``; ``compile``
is the reference loss under ``torch.compile`` (this script's ``--compiled-reference`` worker mode patches
``wmtp_kernels.reference.weighted_mtp_loss_from_hidden`` before the trainer starts). Runs alternate
between implementations, ``--repeats`` times. From each run's ``metrics.jsonl``: the median stage-2 step
time after ``--warmup`` steps (compilation, allocator), its min-max, the process's peak memory (CUDA:
max allocated; CPU: peak RSS) and the losses, which must agree between implementations. Prints a
markdown table (and writes the raw figures with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("fused", "reference", "compile")


def trainer_args(args, impl: str, out: Path) -> list[str]:
    """``python -m wmtp_train`` arguments of one run."""
    loss_impl = "reference" if impl == "compile" else impl
    sets = [
        f"stage2.steps={args.steps}",
        f"stage2.micro_batch_size={args.micro_batch}",
        f"stage2.loss_impl={loss_impl}",
        "stage1.enabled=false",
        "tracking.enabled=false",
        "checkpoint.every=0",
        "run.log_every=1",
        *args.set,
    ]
    argv = ["--recipe", args.recipe, "--preset", args.preset, "--out", str(out)]
    return argv + [a for s in sets for a in ("--set", s)]


def run_once(args, impl: str, out: Path) -> dict:
    """Train in a fresh process; the stage-2 figures of its metrics.jsonl."""
    if impl == "compile":
        cmd = [sys.executable, __file__, "--compiled-reference", "--", *trainer_args(args, impl, out)]
    else:
        cmd = [sys.executable, "-m", "wmtp_train", *trainer_args(args, impl, out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == 2.0 and "step_time_s" in r]
    if len(steps) <= args.warmup:
        raise RuntimeError(
            f"{impl}: {len(steps)} stage-2 steps logged, need more than --warmup={args.warmup}"
        )
    times = [r["step_time_s"] for r in steps[args.warmup :]]
    return {
        "impl": impl,
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "step_max_s": max(times),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[args.warmup :]),
        "peak_mib": max(r["peak_memory_mb"] for r in steps),
        "losses": [r["mtp_loss"] for r in steps],
    }


def compiled_reference_worker(trainer_argv: list[str]) -> int:
    """Run the trainer with the reference loss replaced by its ``torch.compile`` (counted, so a trainer
    that no longer calls it is noticed)."""
    import torch

    import wmtp_kernels.reference as reference
    from wmtp_train.__main__ import main

    compiled = torch.compile(reference.weighted_mtp_loss_from_hidden)
    calls = 0

    def counted(*a, **k):
        nonlocal calls
        calls += 1
        return compiled(*a, **k)

    reference.weighted_mtp_loss_from_hidden = counted
    status = main(trainer_argv)
    if calls == 0:
        print(
            "the trainer never called wmtp_kernels.reference.weighted_mtp_loss_from_hidden", file=sys.stderr
        )
        return 1
    return status or 0


def markdown(results: list[dict], args) -> str:
    by_impl = {impl: [r for r in results if r["impl"] == impl] for impl in args.impls}
    base = statistics.median(r["step_s"] for r in by_impl[args.impls[0]])
    lines = [
        f"`{args.recipe}` recipe, `{args.preset}` preset, stage 2, micro-batch {args.micro_batch}, "
        f"{args.steps} steps ({args.warmup} warm-up) x {args.repeats} run(s) per implementation, "
        f"{platform.machine()} / torch threads as the trainer sets them",
        "",
        f"| loss | step time (median, min-max) | × {args.impls[0]} | tokens/s | peak memory | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for impl, runs in by_impl.items():
        step = statistics.median(r["step_s"] for r in runs)
        lo, hi = min(r["step_min_s"] for r in runs), max(r["step_max_s"] for r in runs)
        tokens = statistics.median(r["tokens_per_s"] for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        lines.append(
            f"| {impl} | {step:.2f} s ({lo:.2f}-{hi:.2f}) | {step / base:.2f} | {tokens:,.0f} | "
            f"{peak:,.0f} MiB | {runs[0]['losses'][-1]:.4f} |"
        )
    first = results[0]["losses"]
    worst = max(abs(a - b) / max(abs(b), 1e-12) for r in results for a, b in zip(r["losses"], first))
    lines += ["", f"Largest relative difference of a step's loss from the first run's: {worst:.2e}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compiled-reference"]:
        return compiled_reference_worker(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--recipe", default="baseline")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated from {IMPLS}; the first is the base"
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="stage-2 steps left out of the timing")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to the trainer"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.impls = [i for i in args.impls.split(",") if i]
    if not args.impls or any(i not in IMPLS for i in args.impls):
        p.error(f"--impls must name some of {IMPLS}, got {args.impls}")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for repeat in range(args.repeats):
            order = args.impls if repeat % 2 == 0 else args.impls[::-1]
            for impl in order:
                results.append(run_once(args, impl, Path(tmp) / f"{impl}-{repeat}"))
                print(
                    f"{impl} (run {repeat + 1}): {results[-1]['step_s']:.2f} s/step",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"argv": argv, "results": results}, indent=1))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
