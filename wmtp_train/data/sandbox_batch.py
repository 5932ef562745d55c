"""Run many short test programs through the sandbox, several per sandboxed process.

Starting a sandboxed process costs ~45 ms here (namespaces, cgroup, a fresh interpreter), far more than a
generated problem's tests take. :func:`check_programs` therefore sends up to ``batch_size`` programs to
one :func:`~wmtp_train.data.sandbox.run_program` call: a small harness ``exec``s each program as
``__main__`` in its own namespace, with its output captured and a per-program CPU-time limit
(``ITIMER_PROF``), and prints one outcome per program. A program passes when it finishes without an
exception (``SystemExit`` with status 0 counts as passing, as for a process). When a batch does not
report cleanly (the harness crashed, ran out of time or memory), every program of that batch is run
again alone, one ``run_program`` call each, and labelled by its exit status.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from wmtp_train.data.sandbox import run_program

log = logging.getLogger(__name__)

OUTCOMES = ("pass", "fail", "timeout")

_HARNESS = """\
import contextlib, io, json, signal


class _CpuLimit(BaseException):
    pass


def _on_limit(signum, frame):
    raise _CpuLimit()


signal.signal(signal.SIGPROF, _on_limit)
_outcomes = []
for _source in {sources!r}:
    _outcome = "fail"
    try:
        signal.setitimer(signal.ITIMER_PROF, {cpu_s!r})
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        _outcome = "pass"
    except SystemExit as _exit:
        _outcome = "pass" if _exit.code in (None, 0) else "fail"
    except _CpuLimit:
        _outcome = "timeout"
    except BaseException:
        pass
    _outcomes.append(_outcome)
print({marker!r} + json.dumps(_outcomes))
"""


@dataclass(frozen=True)
class BatchStats:
    """How the programs were run.

    Attributes:
        programs: programs checked.
        sandbox_runs: ``run_program`` calls (batches plus fallbacks).
        fallback_batches: batches whose programs had to be run one by one.
    """

    programs: int
    sandbox_runs: int
    fallback_batches: int


def _harness(sources: Sequence[str], cpu_s: float) -> tuple[str, str]:
    marker = "wmtp-outcomes-" + hashlib.sha256("\0".join(sources).encode()).hexdigest()[:16] + ":"
    return _HARNESS.format(sources=list(sources), cpu_s=float(cpu_s), marker=marker), marker


def _parse(stdout: str, marker: str, n: int) -> list[str] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(marker):
            try:
                outcomes = json.loads(line[len(marker) :])
            except ValueError:
                return None
            if isinstance(outcomes, list) and len(outcomes) == n and all(o in OUTCOMES for o in outcomes):
                return outcomes
            return None
    return None


def _alone(source: str, cpu_s: float, memory_mb: int) -> str:
    result = run_program(source, timeout_s=max(5.0, 4 * cpu_s), memory_mb=memory_mb)
    return "pass" if result.passed else "timeout" if result.timed_out else "fail"


def check_programs(
    sources: Sequence[str],
    cpu_s: float = 2.0,
    memory_mb: int = 512,
    batch_size: int = 64,
    workers: int = 2,
) -> tuple[list[str], BatchStats]:
    """Run each program in the sandbox and report how it ended (module docstring).

    Args:
        sources: complete programs (e.g. prompt + completion + tests + ``check(entry_point)``).
        cpu_s: CPU-time limit per program.
        memory_mb: address-space limit per sandboxed process.
        batch_size: programs per sandboxed process (1 = one process each).
        workers: sandboxed processes run concurrently.

    Returns:
        ``(outcomes, stats)``: one of :data:`OUTCOMES` per program, in order.
    """
    if batch_size < 1 or workers < 1 or not cpu_s > 0:
        raise ValueError(
            f"need batch_size >= 1, workers >= 1, cpu_s > 0; got {batch_size}, {workers}, {cpu_s}"
        )
    batches = [list(sources[i : i + batch_size]) for i in range(0, len(sources), batch_size)]

    def run_batch(batch: list[str]) -> tuple[list[str], int, bool]:
        if len(batch) == 1:
            return [_alone(batch[0], cpu_s, memory_mb)], 1, False
        program, marker = _harness(batch, cpu_s)
        result = run_program(program, timeout_s=10.0 + 2 * cpu_s * len(batch), memory_mb=memory_mb)
        outcomes = _parse(result.stdout_tail, marker, len(batch)) if result.passed else None
        if outcomes is not None:
            return outcomes, 1, False
        log.warning(
            "sandbox batch of %d programs failed (returncode %s, timed out %s): re-running one by one",
            len(batch),
            result.returncode,
            result.timed_out,
        )
        return [_alone(source, cpu_s, memory_mb) for source in batch], 1 + len(batch), True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run_batch, batches))
    outcomes = [o for batch_outcomes, _, _ in results for o in batch_outcomes]
    stats = BatchStats(
        programs=len(sources),
        sandbox_runs=sum(runs for _, runs, _ in results),
        fallback_batches=sum(fell_back for _, _, fell_back in results),
    )
    return outcomes, stats
