"""Run an untrusted Python program in a contained subprocess and report whether it passed.

Layers, outermost first (each is used when the machine allows it; ``SandboxResult.isolation`` says
which were active):

- a fresh temporary directory as cwd, ``HOME`` and ``TMPDIR``, removed afterwards; a minimal
  environment; ``python -I`` (no user site, no ``PYTHON*`` variables, no script dir on ``sys.path``);
- new network and PID namespaces (``unshare --net --pid --fork --kill-child``; as non-root with
  ``--user --map-root-user``): the program sees only a downed loopback, so no connection leaves it,
  and when its PID-1 dies the kernel kills every process it left behind;
- a pids cgroup (v1, or v2 with ``pids`` delegated) capping the number of tasks: the fork-bomb limit
  that holds even for root, for whom the kernel ignores ``RLIMIT_NPROC``;
- resource limits set before user code, soft = hard: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``
  (effective for non-root users), ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``. They are set
  by the runner itself rather than in ``preexec_fn``, which is unsafe with the builder's threads;
- a wall-clock timeout that SIGKILLs the whole process group (``start_new_session=True``) and every
  task of the cgroup, so the caller never hangs;
- Python-level guards (defence in depth, not a boundary): process creation, sockets, ``ctypes`` and
  ``multiprocessing`` are disabled, and ``open``/``os.open``/path mutators refuse writes outside cwd.

Without namespaces and cgroups (e.g. an unprivileged container) the guards, rlimits and wall-clock
kill remain. Run the builder as an unprivileged user for a filesystem boundary the kernel enforces.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child"]
_MIN_MEMORY_MB = 64


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    Attributes:
        passed: exited with status 0 within the time limit.
        timed_out: killed by the wall-clock timeout.
        returncode: the exit status (negative: killed by that signal), None if it never ended.
        stdout_tail, stderr_tail: the last bytes of each stream, decoded with replacement.
        duration_s: wall-clock seconds.
        isolation: the kernel-side layers that were active, e.g. ``("namespaces", "pids-cgroup")``.
    """

    passed: bool
    timed_out: bool
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    isolation: tuple[str, ...]


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command prefix that works here, or () when namespaces are unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    candidates = [[unshare, *_NAMESPACE_FLAGS]]
    if os.geteuid() != 0:
        candidates.insert(0, [unshare, "--user", "--map-root-user", *_NAMESPACE_FLAGS])
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    log.warning("sandbox: unshare is not usable here; running without network/PID namespaces")
    return ()


def _pids_cgroup_dirs() -> list[Path]:
    """Cgroup directories (this process's own) where a pids-limited child may be created."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    dirs = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ")
        mount_point = left.split()[4]
        fstype, _, super_options = right.split()
        if fstype == "cgroup" and "pids" in super_options.split(","):
            key = next((k for k in own if "pids" in k.split(",")), None)
            if key is not None:
                dirs.append(Path(mount_point) / own[key].lstrip("/"))
        elif fstype == "cgroup2" and "" in own:
            dirs.append(Path(mount_point) / own[""].lstrip("/"))
    return dirs


@functools.cache
def _pids_cgroup_parent() -> Path | None:
    """A writable cgroup whose children get ``pids.max``, or None."""
    try:
        candidates = _pids_cgroup_dirs()
    except OSError:
        return None
    for parent in candidates:
        probe = parent / f"wmtp-sandbox-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
        except OSError:
            continue
        usable = (probe / "pids.max").exists()
        probe.rmdir()
        if usable:
            return parent
    log.warning("sandbox: no writable pids cgroup; the process count relies on RLIMIT_NPROC and guards")
    return None


def _make_cgroup(max_processes: int) -> Path | None:
    parent = _pids_cgroup_parent()
    if parent is None:
        return None
    group = parent / f"wmtp-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(max_processes))
    except OSError as exc:
        log.warning("sandbox: could not set up a pids cgroup (%s)", exc)
        if group.exists():
            group.rmdir()
        return None
    return group


def _kill_cgroup(group: Path) -> None:
    """SIGKILL every task left in the cgroup, then remove it."""
    for _ in range(100):
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.01)  # killed tasks take a moment to leave the group
    log.warning("sandbox: could not remove cgroup %s", group)


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read().decode("utf-8", errors="replace")


def run_program(
    source: str,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    *,
    cpu_s: float | None = None,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    namespaces: bool = True,
    guard: bool = True,
    tail_bytes: int = 4096,
    python: str = sys.executable,
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a contained subprocess (see the module docstring).

    Args:
        source: the Python program.
        timeout_s: wall-clock limit; past it the whole process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB (>= 64).
        cpu_s: CPU-time limit; defaults to ``timeout_s`` rounded up.
        max_processes: task limit (pids cgroup and ``RLIMIT_NPROC``), including the program itself.
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``), stdout/stderr included.
        max_open_files: ``RLIMIT_NOFILE``.
        namespaces: use network/PID namespaces when available.
        guard: install the Python-level guards.
        tail_bytes: how much of stdout/stderr to keep.
        python: the interpreter to run.

    Returns:
        The result; ``passed`` means exit status 0 within the time limit.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < _MIN_MEMORY_MB:
        raise ValueError(f"memory_mb must be >= {_MIN_MEMORY_MB}, got {memory_mb}")
    if max_processes < 1 or max_file_mb < 1 or max_open_files < 16:
        raise ValueError(
            f"need max_processes >= 1, max_file_mb >= 1, max_open_files >= 16; got {max_processes}, "
            f"{max_file_mb}, {max_open_files}"
        )
    prefix = _namespace_prefix() if namespaces else ()
    root = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-"))
    group = None
    try:
        work = root / "work"
        work.mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        group = _make_cgroup(max_processes)
        config = {
            "cpu_s": math.ceil(cpu_s if cpu_s is not None else timeout_s),
            "memory_bytes": memory_mb << 20,
            "max_processes": max_processes,
            "max_file_bytes": max_file_mb << 20,
            "max_open_files": max_open_files,
            "guard": guard,
            "cgroup_procs": str(group / "cgroup.procs") if group else None,
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        command = [*prefix, python, "-I", str(_RUNNER), json.dumps(config)]
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        duration = time.monotonic() - start
        returncode = None if timed_out else proc.returncode
        return SandboxResult(
            passed=not timed_out and returncode == 0,
            timed_out=timed_out,
            returncode=returncode,
            stdout_tail=_tail(root / "stdout", tail_bytes),
            stderr_tail=_tail(root / "stderr", tail_bytes),
            duration_s=duration,
            isolation=tuple(name for name, on in (("namespaces", prefix), ("pids-cgroup", group)) if on),
        )
    finally:
        if group is not None:
            _kill_cgroup(group)
        shutil.rmtree(root, ignore_errors=True)
