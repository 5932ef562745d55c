"""Sandbox throughput: HumanEval checking programs per second through ``run_program``.

Script: ``python benchmarks/bench_sandbox.py [--programs 40] [--workers 1 4] [--repeats 3]`` runs the
checking programs of the first ``--programs`` HumanEval canonical solutions (what the data builder and
the evaluation run), with a thread pool of each ``--workers`` size as they use, and prints one
markdown row per configuration: programs per second (best of ``--repeats``), milliseconds per program
and the ratio to the default measured in the same run. Configurations: the default (namespaces) and
``namespaces=False`` (rlimits and the Python guard only), which isolates the cost of the namespaces
and mounts. The script runs against older versions of the sandbox too, for before/after figures.

Every program must pass; a failure aborts the benchmark (a fast sandbox that fails programs is no
measurement).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

from wmtp_train.data.humaneval import checking_program, load_problems
from wmtp_train.data.sandbox import run_program


def canonical_programs(n: int) -> list[str]:
    problems = load_problems()
    return [checking_program(problems[t], problems[t]["canonical_solution"]) for t in sorted(problems)[:n]]


def programs_per_second(programs: list[str], workers: int, options: dict) -> float:
    def run(program: str) -> None:
        result = run_program(program, timeout_s=20, **options)
        if not result.passed:
            raise RuntimeError(f"a canonical program failed in the sandbox: {result.stderr_tail[-500:]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, programs))
    return len(programs) / (time.perf_counter() - start)


def configurations() -> dict[str, dict]:
    weak = {"namespaces": False}
    if "accept_weak_isolation" in inspect.signature(run_program).parameters:
        weak["accept_weak_isolation"] = True  # the flag that lets it run without kernel isolation
    return {"default": {}, "namespaces=False": weak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    programs = canonical_programs(args.programs)
    run_program("pass\n")  # warm the capability probes outside the timed region
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.release()}, euid {os.geteuid()}")
    print("| configuration | workers | programs/s | ms/program | ratio |")
    print("|---|---|---|---|---|")
    for workers in args.workers:
        reference = None
        for name, options in configurations().items():
            best = max(programs_per_second(programs, workers, options) for _ in range(args.repeats))
            reference = reference or best
            print(f"| {name} | {workers} | {best:.1f} | {1000 / best:.0f} | {best / reference:.2f} |")


if __name__ == "__main__":
    main()
