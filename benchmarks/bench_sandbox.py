"""Sandbox throughput: HumanEval checking programs per second through ``run_program``.

Script: ``python benchmarks/bench_sandbox.py [--programs 40] [--workers 1 4] [--repeats 3]
[--baseline-tree DIR]`` runs the checking programs of the first ``--programs`` HumanEval canonical
solutions (what the data builder and the evaluation run) through a thread pool of each ``--workers``
size, as they do, and prints one markdown row per configuration: programs per second (best of
``--repeats``, the configurations interleaved within each repeat) and the CPU time of the sandbox
processes per program (least of the repeats; steadier than wall time on a shared machine), each with
its ratio to this tree's default measured in the same run. Configurations: this tree's default (kernel
isolation) and ``namespaces=False`` (rlimits and the Python guard only), which isolates the cost of the
namespaces and mounts; with ``--baseline-tree`` (a checkout of another version, e.g.
``mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before``) the same two for that version's
sandbox, loaded by path.

Every program must pass; a failure aborts the benchmark (a fast sandbox that fails programs is no
measurement).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wmtp_train.data import sandbox
from wmtp_train.data.humaneval import checking_program, load_problems


def canonical_programs(n: int) -> list[str]:
    problems = load_problems()
    return [checking_program(problems[t], problems[t]["canonical_solution"]) for t in sorted(problems)[:n]]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(programs: list[str], workers: int, run: Callable) -> tuple[float, float]:
    """Programs per second, and CPU milliseconds per program spent in the sandbox processes."""

    def check(program: str) -> None:
        result = run(program)
        if not result.passed:
            raise RuntimeError(f"a canonical program failed in the sandbox: {result.stderr_tail[-500:]}")

    start, cpu = time.perf_counter(), children_cpu_s()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(check, programs))
    wall, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    return len(programs) / wall, 1000 * cpu / len(programs)


def load_sandbox(tree: Path):
    spec = importlib.util.spec_from_file_location("baseline_sandbox", tree / "wmtp_train/data/sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def configurations(module, label: str) -> dict[str, Callable]:
    weak = {"namespaces": False}
    if "accept_weak_isolation" in inspect.signature(module.run_program).parameters:
        weak["accept_weak_isolation"] = True  # the flag that lets it run without kernel isolation
    return {
        f"{label} default": lambda p: module.run_program(p, timeout_s=20),
        f"{label} namespaces=False": lambda p: module.run_program(p, timeout_s=20, **weak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, default=None)
    args = parser.parse_args()
    programs = canonical_programs(args.programs)
    configs = configurations(sandbox, "this tree")
    if args.baseline_tree is not None:
        configs.update(configurations(load_sandbox(args.baseline_tree), "baseline"))
    for run in configs.values():
        run("pass\n")  # the capability probes, outside the timed region
    print(
        f"{datetime.date.today()} {platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, euid {os.geteuid()}, {len(programs)} programs"
    )
    print("| configuration | workers | programs/s | ratio | CPU ms/program | ratio |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        rates, cpus = {name: [] for name in configs}, {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, run in configs.items():
                rate, cpu = measure(programs, workers, run)
                rates[name].append(rate)
                cpus[name].append(cpu)
        rate_0, cpu_0 = max(rates["this tree default"]), min(cpus["this tree default"])
        for name in configs:
            rate, cpu = max(rates[name]), min(cpus[name])
            row = [name, workers, f"{rate:.1f}", f"{rate / rate_0:.2f}", f"{cpu:.0f}", f"{cpu / cpu_0:.2f}"]
            print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
