"""Run an untrusted Python program in a contained subprocess and report whether it passed.

The filesystem boundary is the kernel's. Every program runs in new mount, network, PID and IPC
namespaces, in a root built for it: read-only bind mounts of ``/usr`` (and ``/bin``, ``/lib``... or
their symlinks), the interpreter's prefixes, ``/etc/ld.so.cache``, ``/etc/localtime``, the caller's
``readonly_paths`` and five harmless devices (``/dev/null``, ``zero``, ``full``, ``random``,
``urandom``); a fresh read-only ``/proc`` of its PID namespace; a private ``/tmp`` tmpfs; and its own
temporary working directory, the one writable host directory. Nothing else of the host exists inside:
not the home directory, the project, its checkpoints or run directories, ``/etc``'s secrets, other
sandboxes. The old root is detached after ``pivot_root``, so no path, ``..``, ``/proc/self/root`` or
directory descriptor leads back to it; only stdin (``/dev/null``), stdout and stderr are inherited.
The program then holds no capability and cannot gain one (empty bounding set, no-new-privileges,
``nosuid`` mounts): as root it runs as ``nobody``; as another user it keeps its uid in a user
namespace. It can neither remount nor unmount; a user namespace it creates itself copies the mounts
locked, read-only flags included.

Why this design: it is the only one of the candidates that holds for root and non-root alike with
nothing to install. ``bubblewrap`` does the same but is rarely installed (not here) and needs a setuid
binary or user namespaces anyway; an unprivileged uid alone still lets the program write wherever that
uid may (world-writable directories, the user's own files when not root). The setup is a few syscalls
through ``ctypes`` in the runner (Python 3.11 has no ``os.unshare``) and one fork (the program is PID 1
of its namespace); binds are non-recursive and made read-only by one remount each, which works on any
kernel since 2.6.26 (``mount_setattr``, 5.12+, is not needed). The runner checks each step and that no
capability is left; any failure is a setup error, never a silently weaker sandbox. Cost: 9-12 % more
CPU per program than the sandbox before this boundary, mostly the fork's copy-on-write faults;
throughput equal within noise (``benchmarks/bench_sandbox.py``).

Where the kernel refuses (no user namespaces for a non-root user, a container without
``CAP_SYS_ADMIN``, seccomp), ``run_program`` refuses to run the program (``SandboxUnavailableError``)
unless the caller accepts the weaker containment with ``accept_weak_isolation=True`` (or
``WMTP_SANDBOX_ACCEPT_WEAK_ISOLATION=1`` in the environment), which is logged as a warning: then only
the rlimits, the pids cgroup, the wall-clock kill and the Python guards remain, and a program can write
and delete wherever its uid may.

Other layers, in every mode: a fresh temporary directory as cwd, ``HOME`` and ``TMPDIR``, removed
afterwards; a minimal environment; ``python -I``; a pids cgroup (v1, or v2 with ``pids`` delegated)
capping the number of tasks, the fork-bomb limit that holds even for root; resource limits set before
user code, soft = hard: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``,
``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``; a wall-clock timeout that SIGKILLs the process group and every
task of the cgroup; Python-level guards on processes, sockets, ``ctypes`` and writes outside the working
directory: defence in depth only, nothing relies on them.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ACCEPT_WEAK_ISOLATION_ENV = "WMTP_SANDBOX_ACCEPT_WEAK_ISOLATION"

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
_MIN_MEMORY_MB = 64


class SandboxUnavailableError(RuntimeError):
    """Kernel isolation is unavailable here and the caller did not accept the weaker containment."""


class SandboxSetupError(RuntimeError):
    """Setting up one run's isolation failed; the program did not run."""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    Attributes:
        passed: exited with status 0 within the time limit.
        timed_out: killed by the wall-clock timeout.
        returncode: the exit status (negative: killed by that signal), None if it never ended.
        stdout_tail, stderr_tail: the last bytes of each stream, decoded with replacement.
        duration_s: wall-clock seconds.
        isolation: the kernel-side layers that were active, e.g. ``("mount-namespace", ...,
            "uid-nobody", "pids-cgroup")``; without ``"mount-namespace"`` the filesystem was not
            isolated.
    """

    passed: bool
    timed_out: bool
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    isolation: tuple[str, ...]


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


def _read_status(fd: int) -> dict | None:
    os.set_blocking(fd, False)  # a runner killed mid-setup may not have closed its end yet
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks)) if chunks else None


def _execute(source: str, settings: dict, timeout_s: float, tail_bytes: int, python: str) -> SandboxResult:
    """Run ``source`` with the runner ``settings``; raises ``SandboxSetupError`` if setup failed."""
    root = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-")).resolve()
    group = None
    status_r, status_w = os.pipe()
    try:
        work = root / "work"
        work.mkdir()
        (root / "new_root").mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        # The runner that waits for the isolated program counts as one more task.
        group = _make_cgroup(settings["max_processes"] + settings["isolate"])
        config = {
            **settings,
            "work": str(work),
            "new_root": str(root / "new_root"),
            "status_fd": status_w,
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
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [python, "-I", str(_RUNNER), json.dumps(config)],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
                pass_fds=(status_w,),
            )
            os.close(status_w)
            status_w = -1
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
        status = _read_status(status_r)
        stderr_tail = _tail(root / "stderr", tail_bytes)
        if not timed_out and (status is None or "layers" not in status):
            reason = status["error"] if status else f"exit status {proc.returncode}: {stderr_tail[-500:]}"
            raise SandboxSetupError(f"sandbox setup failed: {reason}")
        returncode = None if timed_out else proc.returncode
        return SandboxResult(
            passed=not timed_out and returncode == 0,
            timed_out=timed_out,
            returncode=returncode,
            stdout_tail=_tail(root / "stdout", tail_bytes),
            stderr_tail=stderr_tail,
            duration_s=duration,
            isolation=tuple((status or {}).get("layers", [])) + (("pids-cgroup",) if group else ()),
        )
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        if group is not None:
            _kill_cgroup(group)
        shutil.rmtree(root, ignore_errors=True)


def _settings(
    isolate: bool,
    guard: bool,
    readonly_paths: list[str],
    cpu_s: float,
    memory_mb: int,
    max_processes: int,
    max_file_mb: int,
    max_open_files: int,
) -> dict:
    return {
        "isolate": isolate,
        "guard": guard,
        "readonly_paths": readonly_paths,
        "cpu_s": math.ceil(cpu_s),
        "memory_bytes": memory_mb << 20,
        "max_processes": max_processes,
        "max_file_bytes": max_file_mb << 20,
        "max_open_files": max_open_files,
        "tmp_bytes": max_file_mb << 20,
    }


@functools.cache
def _isolation_error(python: str) -> str | None:
    """Why kernel isolation does not work here (None when it does); probed once per interpreter."""
    settings = _settings(True, True, [], 30, 512, 32, 16, 64)
    try:
        result = _execute("import json, math, _json\n", settings, 30.0, 2000, python)
    except SandboxSetupError as exc:
        return str(exc)
    return None if result.passed else f"a trivial program failed when isolated: {result.stderr_tail}"


@functools.cache
def _warn_weak_isolation(reason: str) -> None:
    log.warning(
        "sandbox: UNSAFE: running untrusted programs WITHOUT kernel isolation (%s), as the caller "
        "accepted: only rlimits, the wall-clock kill and the Python guard remain, and a program can "
        "write, delete and read wherever this uid may",
        reason,
    )


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
    readonly_paths: Sequence[str | os.PathLike] = (),
    accept_weak_isolation: bool | None = None,
) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a contained subprocess (see the module docstring).

    Args:
        source: the Python program.
        timeout_s: wall-clock limit; past it the whole process group is killed.
        memory_mb: address-space limit (``RLIMIT_AS``) in MiB (>= 64).
        cpu_s: CPU-time limit; defaults to ``timeout_s`` rounded up.
        max_processes: task limit (pids cgroup and ``RLIMIT_NPROC``), including the program itself.
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``), stdout/stderr included;
            also the size of its private ``/tmp``.
        max_open_files: ``RLIMIT_NOFILE``.
        namespaces: isolate the program in namespaces (the filesystem boundary). False means the weak
            containment, which needs ``accept_weak_isolation``.
        guard: install the Python-level guards.
        tail_bytes: how much of stdout/stderr to keep.
        python: the interpreter to run.
        readonly_paths: existing host files or directories the program may read (symlinks resolved);
            they appear read-only at the same paths (in the weak containment every path is the host's).
        accept_weak_isolation: run even where kernel isolation is unavailable (logged as a warning).
            None reads ``WMTP_SANDBOX_ACCEPT_WEAK_ISOLATION=1`` from the environment.

    Returns:
        The result; ``passed`` means exit status 0 within the time limit.

    Raises:
        SandboxUnavailableError: kernel isolation is unavailable and the weaker containment was not
            accepted.
        SandboxSetupError: the isolation of this run failed (the program did not run).
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
    if isinstance(readonly_paths, (str, bytes, os.PathLike)):
        raise TypeError(f"readonly_paths must be a sequence of paths, got the single path {readonly_paths!r}")
    missing = [str(p) for p in readonly_paths if not os.path.exists(p)]
    if missing:
        raise ValueError(f"readonly_paths: no such file or directory: {missing}")
    reason = _isolation_error(python) if namespaces else "namespaces=False"
    if reason is not None:
        if accept_weak_isolation is None:
            accept_weak_isolation = os.environ.get(ACCEPT_WEAK_ISOLATION_ENV) == "1"
        if not accept_weak_isolation:
            raise SandboxUnavailableError(
                f"kernel isolation is unavailable ({reason}); refusing to run untrusted code with only "
                f"the Python guard. Run as root, allow user namespaces, or accept the weaker containment "
                f"with accept_weak_isolation=True or {ACCEPT_WEAK_ISOLATION_ENV}=1"
            )
        _warn_weak_isolation(reason)
    settings = _settings(
        isolate=reason is None,
        guard=guard,
        readonly_paths=[os.path.realpath(p) for p in readonly_paths],
        cpu_s=cpu_s if cpu_s is not None else timeout_s,
        memory_mb=memory_mb,
        max_processes=max_processes,
        max_file_mb=max_file_mb,
        max_open_files=max_open_files,
    )
    return _execute(source, settings, timeout_s, tail_bytes, python)
