import os
import socket
from pathlib import Path

import pytest
from sandbox_utils import kernel_allows_namespaces

from wmtp_train.data.sandbox import ACCEPT_WEAK_ISOLATION_ENV, _pids_cgroup_parent, run_program

KERNEL_PROCESS_LIMIT = _pids_cgroup_parent() is not None or os.geteuid() != 0
WEAK = {"namespaces": False, "accept_weak_isolation": True}  # rlimits and the Python guard only


@pytest.fixture(autouse=True)
def _weak_where_the_kernel_refuses(monkeypatch):
    """These tests check the limits and guards, present in both modes; the boundary has its own tests."""
    if not kernel_allows_namespaces():
        monkeypatch.setenv(ACCEPT_WEAK_ISOLATION_ENV, "1")


def live_sandbox_processes(marker_memory_mb):
    """Processes still running a sandbox started with this (unusual) memory limit."""
    marker = f'"memory_bytes": {marker_memory_mb << 20}'
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "_sandbox_runner" in cmdline:
                found.append(int(entry.name))
    return found


def test_correct_program_passes_and_wrong_one_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')\n", timeout_s=10)
    assert ok.passed and not ok.timed_out and ok.returncode == 0 and ok.stdout_tail == "fine\n"
    bad = run_program("def f(x):\n    return x - 1\nassert f(1) == 2\n", timeout_s=10)
    assert not bad.passed and bad.returncode == 1 and "AssertionError" in bad.stderr_tail


def test_program_runs_in_a_fresh_temp_dir_that_is_removed():
    src = "import os, sys\nprint(os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'], sys.flags.isolated)\n"
    result = run_program(src, timeout_s=10)
    cwd, home, tmpdir, isolated = result.stdout_tail.split()
    assert cwd == home == tmpdir and isolated == "1"
    assert not Path(cwd).exists()
    assert run_program("open('scratch.txt', 'w').write('x')\n", timeout_s=10).passed


@pytest.mark.parametrize("isolation", [{}, WEAK], ids=["default", "weak"])
def test_exit_status_and_crash_signal_are_reported(isolation):
    assert run_program("import sys\nsys.exit(7)\n", **isolation).returncode == 7
    crash = run_program("import ctypes\nctypes.string_at(0)\n", guard=False, **isolation)
    assert crash.returncode == -11 and not crash.passed  # SIGSEGV, as if it ran unwrapped


def test_infinite_loop_is_killed_by_the_wall_clock():
    result = run_program("while True:\n    pass\n", timeout_s=1, memory_mb=331)
    assert result.timed_out and not result.passed and result.returncode is None
    assert live_sandbox_processes(331) == []


def test_sleeping_program_is_killed_by_the_wall_clock():
    result = run_program("import time\ntime.sleep(600)\n", timeout_s=1)
    assert result.timed_out and not result.passed


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_program("while True:\n    pass\n", timeout_s=60, cpu_s=1)
    assert not result.timed_out and not result.passed and result.returncode != 0


def test_huge_allocation_is_refused():
    result = run_program("x = bytearray(8 * 1024**3)\n", timeout_s=20, memory_mb=256)
    assert not result.passed and "MemoryError" in result.stderr_tail


def test_output_flood_is_cut_by_the_file_size_limit():
    result = run_program("while True:\n    print('x' * 10000)\n", timeout_s=20, max_file_mb=1)
    assert not result.passed and not result.timed_out


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
        "import multiprocessing\n",
        "import ctypes\nctypes.CDLL(None).fork()\n",
        "import os\nos.system('sleep 100')\n",
    ],
)
def test_process_creation_is_blocked_by_the_guard(bomb):
    result = run_program(bomb, timeout_s=10, memory_mb=332)
    assert not result.passed and not result.timed_out
    assert "PermissionError" in result.stderr_tail or "ModuleNotFoundError" in result.stderr_tail
    assert live_sandbox_processes(332) == []


BOUNDED_BOMB = """
import os, time
forked = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.setsid()  # try to escape the process group
        time.sleep(300)
        os._exit(0)
    forked += 1
print(forked, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not KERNEL_PROCESS_LIMIT, reason="root without a writable pids cgroup")
def test_fork_bomb_past_the_guard_is_capped_by_the_kernel_and_fully_killed():
    result = run_program(BOUNDED_BOMB, timeout_s=3, max_processes=8, memory_mb=333, guard=False)
    assert result.timed_out
    # At most max_processes - 1 children (the program itself counts); 0 when the uid is already at
    # its RLIMIT_NPROC (non-root without a user namespace), which is contained too.
    assert int(result.stdout_tail) < 8
    assert live_sandbox_processes(333) == []


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    yield server.getsockname()[1], server
    server.close()


def assert_no_connection(server):
    with pytest.raises(TimeoutError):
        server.accept()


def connect_program(port):
    return (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')\n"
    )


def test_socket_use_is_blocked_by_the_guard(listener):
    port, server = listener
    result = run_program(connect_program(port), timeout_s=10, **WEAK)
    assert (
        not result.passed
        and "PermissionError" in result.stderr_tail
        and "CONNECTED" not in result.stdout_tail
    )
    assert_no_connection(server)


@pytest.mark.skipif(not kernel_allows_namespaces(), reason="the kernel refuses the namespaces")
def test_network_namespace_blocks_connections_past_the_guard(listener):
    port, server = listener
    result = run_program(connect_program(port), timeout_s=10, guard=False)
    assert "network-namespace" in result.isolation
    assert not result.passed and "CONNECTED" not in result.stdout_tail
    assert "unreachable" in result.stderr_tail or "refused" in result.stderr_tail
    assert_no_connection(server)


@pytest.mark.parametrize(
    "write",
    [
        "open({target!r}, 'w').write('owned')",
        "open({target!r}, 'a').write('owned')",
        "import pathlib; pathlib.Path({target!r}).write_text('owned')",
        "import os; os.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
        "open('inside.txt', 'w').write('x'); import os; os.rename('inside.txt', {target!r})",
        "import shutil; open('inside.txt', 'w').write('x'); shutil.copy('inside.txt', {target!r})",
        "import _io; _io.open({target!r}, 'w').close()",
        "import _io; _io.FileIO({target!r}, 'a').write(b'owned')",
        "import io; io.FileIO({target!r}, 'w').write(b'owned')",
    ],
)
def test_python_guard_refuses_writes_outside_the_temp_dir(tmp_path, write):
    """Defence in depth, shown without kernel isolation (the boundary: test_sandbox_escapes.py)."""
    target = tmp_path / "escaped.txt"
    result = run_program(write.format(target=str(target)) + "\n", timeout_s=10, **WEAK)
    assert not result.passed and "PermissionError" in result.stderr_tail
    assert not target.exists()


@pytest.mark.parametrize(
    "delete",
    [
        "import os; os.remove({victim!r})",
        "import posix; posix.unlink({victim!r})",
        "import os; os.unlink({name!r}, dir_fd=os.open({parent!r}, os.O_RDONLY))",
    ],
)
def test_python_guard_refuses_deletes_outside_the_temp_dir(tmp_path, delete):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    source = delete.format(victim=str(victim), name=victim.name, parent=str(tmp_path))
    result = run_program(source + "\n", timeout_s=10, **WEAK)
    assert not result.passed and "PermissionError" in result.stderr_tail
    assert victim.read_text() == "keep"


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="source"):
        run_program(b"print(1)")
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=1)
