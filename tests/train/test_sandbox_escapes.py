"""Escapes from the sandbox's filesystem boundary, each checked from outside on a canary.

Every attack runs with the Python guard off (``guard=False``), so only the kernel stands between it and
the canary: a directory the test exposes read-only (``readonly_paths``) whose entries the sandboxed uid
owns and may write by permission bits (0o777 / 0o666). Each program first proves it reads the real
canary (``REACHED``), then attacks it and prints ``ESCAPED`` if nothing raised. The test then compares
the whole canary tree (content, mode, owner, size, mtime, ctime, link count, inode) with its state
before. The non-root path (user namespaces) is exercised by running the same attacks as ``nobody``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sandbox_utils import kernel_allows_namespaces

import wmtp_train
from wmtp_train.data import sandbox
from wmtp_train.data.sandbox import (
    ACCEPT_WEAK_ISOLATION_ENV,
    SandboxSetupError,
    SandboxUnavailableError,
    run_program,
)

pytestmark = pytest.mark.skipif(not kernel_allows_namespaces(), reason="the kernel refuses the namespaces")

NOBODY = 65534
SANDBOX_UID = NOBODY if os.geteuid() == 0 else os.geteuid()  # the uid programs run as
FIXED_TIME_NS = 1_000_000_000 * 10**9


@dataclass(frozen=True)
class Canary:
    base: Path  # holds everything below; created by the test, removed afterwards
    dir: Path  # exposed read-only; the sandboxed uid owns it and every entry, all writable by mode
    file: Path
    sub: Path  # a non-empty directory
    empty: Path
    link: Path  # a symlink to ``file``
    hidden: Path  # a file in base, not exposed


def make_canary() -> Canary:
    base = Path(tempfile.mkdtemp(prefix="wmtp-canary-"))
    base.chmod(0o755)  # traversable by the sandboxed uid (the non-root run needs it)
    directory = base / "exposed"
    c = Canary(
        base,
        directory,
        directory / "canary.txt",
        directory / "sub",
        directory / "empty",
        directory / "link",
        base / "hidden" / "secret.txt",
    )
    for d in (c.dir, c.sub, c.empty, c.hidden.parent):
        d.mkdir()
        d.chmod(0o777)
    for f in (c.file, c.sub / "inner.txt", c.hidden):
        f.write_text("canary\n")
        f.chmod(0o666)
    c.link.symlink_to("canary.txt")
    for path in [c.dir, *c.dir.rglob("*"), c.hidden.parent, c.hidden]:
        if os.geteuid() == 0:
            os.lchown(path, SANDBOX_UID, SANDBOX_UID)
        os.utime(path, ns=(FIXED_TIME_NS, FIXED_TIME_NS), follow_symlinks=False)
    return c


def snapshot(base: Path) -> dict:
    """Everything about the tree that a write, delete, rename, link, chmod, chown or utime changes."""
    state = {}
    for path in [base, *sorted(base.rglob("*"))]:
        st = path.lstat()
        entry = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry += (st.st_nlink, st.st_ino)
        if stat.S_ISREG(st.st_mode):
            entry += (path.read_bytes(),)
        elif stat.S_ISLNK(st.st_mode):
            entry += (os.readlink(path),)
        state[str(path.relative_to(base))] = entry
    return state


@pytest.fixture
def canary():
    c = make_canary()
    yield c
    shutil.rmtree(c.base, ignore_errors=True)


PRELUDE = "import os\nassert open({file!r}).read() == 'canary\\n'\nprint('REACHED', flush=True)\n"
DIR_FD = "d = os.open({dir!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
LIBC = (
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "def check(result):\n"
    "    if result < 0:\n"
    "        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))\n"
    "    return result\n"
)
# New user and mount namespaces: every capability inside them. /proc is read-only in the sandbox, so
# the uid maps cannot be written; the capabilities stay all the same.
USERNS = (
    LIBC + "check(libc.unshare(0x10000000 | 0x00020000))\nprint('IN USERNS', flush=True)\n"
    "for name, text in [('setgroups', 'deny'), ('uid_map', '0 %d 1' % os.getuid())]:\n"
    "    try:\n"
    "        open('/proc/self/' + name, 'w').write(text)\n"
    "    except OSError:\n"
    "        pass\n"
)
SHOCKER = (
    LIBC + "class Handle(ctypes.Structure):\n"
    "    _fields_ = [('size', ctypes.c_uint), ('type', ctypes.c_int), ('data', ctypes.c_ubyte * 8)]\n"
    "handle = Handle(8, 1, (ctypes.c_ubyte * 8)(2, 0, 0, 0, 0, 0, 0, 0))  # ext4's root: inode 2\n"
    "fd = libc.open_by_handle_at(os.open('/usr', os.O_RDONLY), ctypes.byref(handle), os.O_RDONLY)\n"
    "check(fd)\nprint('ESCAPED', os.listdir(fd), flush=True)  # the host's root: reads are out already\n"
    "os.open({file!r}.lstrip('/'), os.O_WRONLY | os.O_TRUNC, dir_fd=fd)\n"
)

# The four escapes reported against the Python guard.
ISSUE_ATTACKS = {
    "posix.unlink": "import posix\nposix.unlink({file!r})",
    "unlink with dir_fd": DIR_FD + "os.unlink('canary.txt', dir_fd=d)",
    "_io.open truncation": "import _io\n_io.open({file!r}, 'w').close()",
    "_io.FileIO write": "import _io\n_io.FileIO({file!r}, 'w').write(b'owned')",
}

ATTACKS = {
    **ISSUE_ATTACKS,
    # write, append, truncate, create
    "open w": "open({file!r}, 'w').write('owned')",
    "open a": "open({file!r}, 'a').write('owned')",
    "open r+": "open({file!r}, 'r+').write('owned')",
    "open x in dir": "open({dir!r} + '/new.txt', 'x').write('owned')",
    "io.open": "import io\nio.open({file!r}, 'w').write('owned')",
    "_io.FileIO append": "import _io\n_io.FileIO({file!r}, 'a').write(b'owned')",
    "_io.FileIO create": "import _io\n_io.FileIO({dir!r} + '/new.txt', 'w').write(b'owned')",
    "io.FileIO r+": "import io\nio.FileIO({file!r}, 'r+').write(b'owned')",
    "os.open O_TRUNC": "os.open({file!r}, os.O_WRONLY | os.O_TRUNC)",
    "posix.open O_RDWR": "import posix\nposix.write(posix.open({file!r}, posix.O_RDWR), b'owned')",
    "os.open O_CREAT": "os.open({dir!r} + '/new.txt', os.O_WRONLY | os.O_CREAT, 0o666)",
    "O_CREAT with dir_fd": DIR_FD + "os.open('new.txt', os.O_WRONLY | os.O_CREAT, 0o666, dir_fd=d)",
    "O_TMPFILE in dir": "os.open({dir!r}, os.O_TMPFILE | os.O_WRONLY, 0o666)",
    "os.truncate": "os.truncate({file!r}, 0)",
    "ftruncate read-only fd": "os.ftruncate(os.open({file!r}, os.O_RDONLY), 0)",
    "pathlib write_text": "import pathlib\npathlib.Path({file!r}).write_text('owned')",
    "pathlib write_bytes new": "import pathlib\npathlib.Path({dir!r}, 'new.bin').write_bytes(b'x')",
    "pathlib touch": "import pathlib\npathlib.Path({file!r}).touch()",
    "pathlib touch new": "import pathlib\npathlib.Path({dir!r}, 'new').touch()",
    "mmap r+": "import mmap\nm = mmap.mmap(open({file!r}, 'r+b').fileno(), 0)\nm[0:1] = b'X'\nm.flush()",
    "mmap write on read-only fd": (
        "import mmap\nm = mmap.mmap(os.open({file!r}, os.O_RDONLY), 0, access=mmap.ACCESS_WRITE)\n"
        "m[0:1] = b'X'\nm.flush()"
    ),
    "shutil.copy": "import shutil\nopen('in.txt', 'w').write('owned')\nshutil.copy('in.txt', {file!r})",
    "shutil.copyfile": "import shutil\nopen('in.txt', 'w').write('x')\nshutil.copyfile('in.txt', {file!r})",
    "shutil.copytree": "import shutil\nos.mkdir('t')\nshutil.copytree('t', {dir!r} + '/tree')",
    "through the symlink": "open({link!r}, 'w').write('owned')",
    "os.setxattr": "os.setxattr({file!r}, 'user.owned', b'1')",
    # through /proc and relative paths
    "reopen read-only fd via /proc/self/fd": (
        "fd = os.open({file!r}, os.O_RDONLY)\nopen(f'/proc/self/fd/{{fd}}', 'w').write('owned')"
    ),
    "dir fd via /proc/self/fd": DIR_FD + "open(f'/proc/self/fd/{{d}}/canary.txt', 'w').write('owned')",
    "/proc/self/root": "open('/proc/self/root' + {file!r}, 'w').write('owned')",
    "/proc/1/root": "open('/proc/1/root' + {file!r}, 'w').write('owned')",
    "/proc/self/cwd and ..": "open('/proc/self/cwd/' + os.path.relpath({file!r}), 'w').write('owned')",
    # delete
    "os.remove": "os.remove({file!r})",
    "os.unlink": "os.unlink({file!r})",
    "pathlib unlink": "import pathlib\npathlib.Path({file!r}).unlink()",
    "unlink via /proc/self/fd": DIR_FD + "os.unlink(f'/proc/self/fd/{{d}}/canary.txt')",
    "os.rmdir": "os.rmdir({empty!r})",
    "rmdir with dir_fd": DIR_FD + "os.rmdir('empty', dir_fd=d)",
    "os.removedirs": "os.removedirs({empty!r})",
    "shutil.rmtree": "import shutil\nshutil.rmtree({dir!r})",
    # rename and move
    "os.rename in dir": "os.rename({file!r}, {dir!r} + '/moved.txt')",
    "os.rename dir": "os.rename({sub!r}, {dir!r} + '/sub2')",
    "os.rename out to work": "os.rename({file!r}, 'stolen.txt')",
    "os.replace from work": "open('in.txt', 'w').write('owned')\nos.replace('in.txt', {file!r})",
    "renameat with dir_fd": DIR_FD + "os.rename('canary.txt', 'moved', src_dir_fd=d, dst_dir_fd=d)",
    "shutil.move": "import shutil\nshutil.move({file!r}, 'stolen.txt')",
    "pathlib rename": "import pathlib\npathlib.Path({file!r}).rename({dir!r} + '/moved.txt')",
    # links
    "hard link in dir": "os.link({file!r}, {dir!r} + '/hard')",
    "hard link into work": "os.link({file!r}, 'hard')",
    "symlink in dir": "os.symlink('/etc/passwd', {dir!r} + '/sym')",
    "symlink with dir_fd": DIR_FD + "os.symlink('/etc/passwd', 'sym', dir_fd=d)",
    "pathlib symlink_to": "import pathlib\npathlib.Path({dir!r}, 'sym').symlink_to('/etc')",
    "pathlib hardlink_to": "import pathlib\npathlib.Path({dir!r}, 'hard').hardlink_to({file!r})",
    # directories and special files
    "os.mkdir": "os.mkdir({dir!r} + '/newdir')",
    "os.makedirs": "os.makedirs({sub!r} + '/a/b')",
    "mkdir with dir_fd": DIR_FD + "os.mkdir('newdir', dir_fd=d)",
    "pathlib mkdir": "import pathlib\npathlib.Path({dir!r}, 'newdir').mkdir()",
    "os.mkfifo": "os.mkfifo({dir!r} + '/fifo')",
    "os.mknod": "import stat\nos.mknod({dir!r} + '/node', stat.S_IFREG | 0o644)",
    # permissions, ownership, times
    "os.chmod file": "os.chmod({file!r}, 0o600)",
    "os.chmod dir": "os.chmod({dir!r}, 0o700)",
    "os.fchmod read-only fd": "os.fchmod(os.open({file!r}, os.O_RDONLY), 0o600)",
    "chmod with dir_fd": DIR_FD + "os.chmod('canary.txt', 0o600, dir_fd=d)",
    "pathlib chmod": "import pathlib\npathlib.Path({file!r}).chmod(0o600)",
    "os.chown": "os.chown({file!r}, os.getuid(), os.getgid())",
    "os.lchown": "os.lchown({link!r}, os.getuid(), os.getgid())",
    "os.fchown read-only fd": "os.fchown(os.open({file!r}, os.O_RDONLY), os.getuid(), os.getgid())",
    "shutil.chown": "import shutil\nshutil.chown({dir!r}, os.getuid())",
    "os.utime": "os.utime({file!r}, (0, 0))",
    "os.utime now": "os.utime({file!r})",
    "os.utime dir": "os.utime({dir!r}, (0, 0))",
    "utime on fd": "os.utime(os.open({file!r}, os.O_RDONLY), (0, 0))",
    "utime with dir_fd": DIR_FD + "os.utime('canary.txt', (0, 0), dir_fd=d)",
    # privileges and mounts
    "setuid 0": "os.setuid(0)",
    "remount rw": LIBC + "check(libc.mount(None, {dir!r}.encode(), None, 32 | 4096, None))\n"
    "open({file!r}, 'w').write('owned')",
    "remount / rw": LIBC + "check(libc.mount(None, b'/', None, 32, None))\nopen({file!r}, 'w').write('x')",
    "unmount": LIBC + "check(libc.umount2({dir!r}.encode(), 2))\nopen({file!r}, 'w').write('owned')",
    "user namespace, remount rw": USERNS
    + "check(libc.mount(None, {dir!r}.encode(), None, 32 | 4096, None))\nopen({file!r}, 'w').write('owned')",
    "user namespace, unmount": USERNS
    + "check(libc.umount2({dir!r}.encode(), 2))\nopen({file!r}, 'w').write('x')",
    "user namespace, chroot escape": USERNS + "os.mkdir('jail')\nos.chroot('jail')\n"
    "for _ in range(30):\n    os.chdir('..')\nos.chroot('.')\nopen({file!r}, 'w').write('owned')",
    "open_by_handle_at (shocker)": SHOCKER,
    "user namespace, open_by_handle_at": USERNS + SHOCKER,
}


def attack_program(code: str, c: Canary) -> str:
    fields = {k: str(getattr(c, k)) for k in ("file", "dir", "sub", "empty", "link")}
    return (PRELUDE + code + "\nprint('ESCAPED', flush=True)\n").format(**fields)


def assert_attack_failed(name: str, c: Canary, before: dict, stdout: str, stderr: str) -> None:
    assert "REACHED" in stdout, f"{name}: the program did not see the canary (the test tests nothing)"
    if USERNS in ATTACKS[name]:
        assert "IN USERNS" in stdout, f"{name}: could not even create the user namespace"
    assert "ESCAPED" not in stdout, f"{name}: the attack ran to its end"
    last_line = stderr.strip().splitlines()[-1]
    # A syscall refused it; not ENOENT, which would mean it missed the canary.
    assert re.match(r"\w+Error: \[Errno (?!2\])\d+\]", last_line), f"{name}: {last_line}"
    assert snapshot(c.base) == before, f"{name}: the canary changed"


def test_isolation_is_available_where_the_kernel_allows_it():
    assert sandbox._isolation_error(sys.executable) is None


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_on_an_exposed_directory_changes_nothing(canary, name):
    before = snapshot(canary.base)
    result = run_program(attack_program(ATTACKS[name], canary), guard=False, readonly_paths=[canary.dir])
    assert "mount-namespace" in result.isolation
    assert not result.passed
    assert_attack_failed(name, canary, before, result.stdout_tail, result.stderr_tail)


@pytest.mark.parametrize("name", ISSUE_ATTACKS)
def test_reported_escapes_fail_with_default_settings(canary, name):
    before = snapshot(canary.base)
    result = run_program(attack_program(ISSUE_ATTACKS[name], canary), readonly_paths=[canary.dir])
    assert not result.passed and "REACHED" in result.stdout_tail and "ESCAPED" not in result.stdout_tail
    assert snapshot(canary.base) == before  # the guard may refuse first: no syscall error expected


def test_weak_containment_lets_a_write_through(canary, monkeypatch):
    """The canary check catches a real write: without kernel isolation and guard, a write lands."""
    monkeypatch.delenv(ACCEPT_WEAK_ISOLATION_ENV, raising=False)
    before = snapshot(canary.base)
    source = f"open({str(canary.file)!r}, 'w').write('owned')\n"
    result = run_program(source, namespaces=False, guard=False, accept_weak_isolation=True)
    assert result.passed and "mount-namespace" not in result.isolation
    assert snapshot(canary.base) != before and canary.file.read_text() == "owned"


HIDDEN_CHECK = """
import json, os
found = {}
for path in json.loads(PATHS):
    try:
        with open(path, 'rb') as f:
            found[path] = f'read {len(f.read())} bytes'
    except OSError as exc:
        found[path] = type(exc).__name__
print(json.dumps(found))
"""


def test_home_project_checkpoints_and_secrets_are_invisible(canary, tmp_path):
    secret = Path.home() / f".wmtp-sandbox-secret-{uuid.uuid4().hex}"
    secret.write_text("secret\n")
    checkpoint = tmp_path / "runs" / "run-1" / "checkpoints" / "step_00000010" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    hidden = [
        str(secret),
        str(checkpoint),
        str(canary.hidden),
        wmtp_train.__file__,
        "/etc/shadow",
        "/etc/passwd",
    ]
    try:
        result = run_program(
            HIDDEN_CHECK.replace("PATHS", repr(json.dumps([*hidden, str(canary.file)]))),
            readonly_paths=[canary.dir],
        )
    finally:
        secret.unlink()
    assert result.passed, result.stderr_tail
    found = json.loads(result.stdout_tail)
    assert found[str(canary.file)] == "read 7 bytes"  # the positive control
    assert {path: found[path] for path in hidden} == dict.fromkeys(hidden, "FileNotFoundError")


def test_home_directory_shows_only_the_path_to_the_interpreter():
    home = Path.home()
    result = run_program(f"import json, os\nprint(json.dumps(sorted(os.listdir({str(home)!r}))))\n")
    if not result.passed:  # the home directory does not exist inside at all
        assert "FileNotFoundError" in result.stderr_tail
        return
    prefix = Path(sys.prefix)
    allowed = [prefix.relative_to(home).parts[0]] if prefix.is_relative_to(home) else []
    assert json.loads(result.stdout_tail) == allowed


NORMAL_PROGRAM = """
import os
fds = sorted(os.listdir('/proc/self/fd'))
import bisect, collections, datetime, decimal, fractions, functools, hashlib, heapq, itertools, json
import math, os, random, re, sqlite3, statistics, string, tempfile, textwrap, time, typing, zlib
assert math.gcd(12, 18) == 6 and statistics.mean([1, 2, 3]) == 2
with tempfile.NamedTemporaryFile('w', delete=False) as f:
    f.write('x')
assert os.path.dirname(f.name) == os.getcwd()
open('here.txt', 'w').write('work')
os.makedirs('/tmp/MARKER/d')
open('/tmp/MARKER/d/x.txt', 'w').write('tmp')
assert open('/tmp/MARKER/d/x.txt').read() == 'tmp' and open('here.txt').read() == 'work'
os.remove('here.txt')
sqlite3.connect(':memory:').execute('select 1')
print(json.dumps([len(os.urandom(8)), time.localtime().tm_year > 2000, fds]))
"""
NORMAL_OUTPUT = [8, True, ["0", "1", "2", "3"]]  # fd 3: listdir's own


def test_a_normal_program_imports_the_stdlib_and_writes_its_dirs():
    marker = f"wmtp-sandbox-private-{uuid.uuid4().hex}"
    result = run_program(NORMAL_PROGRAM.replace("MARKER", marker))
    assert result.passed, result.stderr_tail
    assert json.loads(result.stdout_tail) == NORMAL_OUTPUT
    assert not (Path(tempfile.gettempdir()) / marker).exists()  # its /tmp was private


def test_program_holds_no_capabilities_and_cannot_gain_them():
    src = "print(''.join(l for l in open('/proc/self/status') if l.startswith(('Cap', 'NoNewPrivs', 'Uid'))))"
    result = run_program(src)
    assert result.passed, result.stderr_tail
    fields = dict(line.split(":\t") for line in result.stdout_tail.strip().splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    assert set(fields["Uid"].split()) == {str(SANDBOX_UID)}


def test_refuses_without_kernel_isolation_unless_the_weaker_guard_is_accepted(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_isolation_error", lambda python: "simulated: no namespaces")
    monkeypatch.delenv(ACCEPT_WEAK_ISOLATION_ENV, raising=False)
    sandbox._warn_weak_isolation.cache_clear()
    with pytest.raises(SandboxUnavailableError, match="simulated: no namespaces.*accept_weak_isolation"):
        run_program("print('ran')\n")
    with pytest.raises(SandboxUnavailableError):
        run_program("print('ran')\n", accept_weak_isolation=False)
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        accepted = run_program("print('ran')\n", accept_weak_isolation=True)
    assert accepted.passed and accepted.stdout_tail == "ran\n" and "mount-namespace" not in accepted.isolation
    assert "UNSAFE" in caplog.text and "simulated: no namespaces" in caplog.text
    monkeypatch.setenv(ACCEPT_WEAK_ISOLATION_ENV, "1")
    assert run_program("print('ran')\n").passed
    with pytest.raises(SandboxUnavailableError):  # namespaces=False is the weak containment too
        run_program("pass\n", namespaces=False, accept_weak_isolation=False)


def test_a_failed_setup_raises_instead_of_failing_the_program(monkeypatch, tmp_path):
    broken = tmp_path / "runner.py"
    broken.write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(sandbox, "_isolation_error", lambda python: None)
    monkeypatch.setattr(sandbox, "_RUNNER", broken)
    with pytest.raises(SandboxSetupError, match="exit status 3"):
        run_program("pass\n")


def test_readonly_paths_may_lie_inside_exposed_ones(canary):
    paths = [str(canary.file), "/usr/share", "/etc/localtime", str(canary.dir)]
    result = run_program(f"print(open({str(canary.file)!r}).read(), end='')\n", readonly_paths=paths)
    assert result.passed and result.stdout_tail == "canary\n", result.stderr_tail


def test_missing_readonly_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="readonly_paths"):
        run_program("pass\n", readonly_paths=[tmp_path / "missing"])
    with pytest.raises(TypeError, match="readonly_paths"):
        run_program("pass\n", readonly_paths=str(tmp_path))


NON_ROOT_DRIVER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
for job in json.load(sys.stdin):
    result = sandbox.run_program(job["source"], guard=False, readonly_paths=[job["dir"]])
    print(json.dumps({"name": job["name"], "result": result.__dict__}))
"""


def reach_interpreter_as_nobody(stash: Path) -> str:
    """Shell commands (run as root in a private mount namespace) letting ``nobody`` run this Python."""
    prefix = Path(sys.base_prefix).resolve()
    blocking = [p for p in prefix.parents if not os.stat(p).st_mode & stat.S_IXOTH]
    if not blocking:
        return ""
    top = blocking[-1]  # the outermost directory others cannot traverse, e.g. /root
    return (
        f"mount --bind {prefix} {stash} && mount -t tmpfs -o mode=0755 tmpfs {top} && "
        f"mkdir -p {prefix} && mount --move {stash} {prefix} && "
    )


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="needs root with util-linux unshare and setpriv to run the attacks as nobody",
)
def test_attacks_fail_for_a_non_root_user_in_a_user_namespace():
    canaries = {name: make_canary() for name in ATTACKS}
    stash = Path(tempfile.mkdtemp(prefix="wmtp-stash-"))  # a mount point, in the harness's namespace only
    # Copies nobody can read (the sandbox and the runner it starts beside it): the checkout may sit below
    # a directory only root may enter (mktemp -d).
    source_dir = Path(tempfile.mkdtemp(prefix="wmtp-sandbox-source-"))
    source_dir.chmod(0o755)
    for name in ("sandbox.py", "_sandbox_runner.py"):
        shutil.copy(Path(sandbox.__file__).with_name(name), source_dir / name)
    sandbox_py = source_dir / "sandbox.py"
    try:
        before = {name: snapshot(c.base) for name, c in canaries.items()}
        jobs = [
            {"name": name, "source": attack_program(code, canaries[name]), "dir": str(canaries[name].dir)}
            for name, code in ATTACKS.items()
        ]
        normal = NORMAL_PROGRAM.replace("MARKER", "private")
        jobs.append({"name": "normal program", "source": normal, "dir": jobs[0]["dir"]})
        command = reach_interpreter_as_nobody(stash) + shlex.join(
            ["exec", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            + [sys.executable, "-I", "-c", NON_ROOT_DRIVER, str(sandbox_py)]
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results = [json.loads(line) for line in done.stdout.splitlines()]
        assert [r["name"] for r in results] == [*ATTACKS, "normal program"]
        normal = results.pop()["result"]
        assert normal["passed"] and json.loads(normal["stdout_tail"]) == NORMAL_OUTPUT, normal["stderr_tail"]
        for r in results:
            name, result = r["name"], r["result"]
            assert {"user-namespace", "mount-namespace"} <= set(result["isolation"]), result
            stdout, stderr = result["stdout_tail"], result["stderr_tail"]
            assert_attack_failed(name, canaries[name], before[name], stdout, stderr)
    finally:
        stash.rmdir()
        shutil.rmtree(source_dir, ignore_errors=True)
        for c in canaries.values():
            shutil.rmtree(c.base, ignore_errors=True)
