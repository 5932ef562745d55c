"""Entry point of a sandboxed program; run by ``sandbox.run_program`` as ``python -I <this> CONFIG``.

Standard library only (it runs isolated, without the project on ``sys.path``). In order, before any
user code: join the pids cgroup if one is given; if asked, isolate (below); set the resource limits
(soft = hard); install the Python-level guards if asked; report on the status pipe that setup is done
(or why it failed) and close it; then read ``program.py`` from the working directory and execute it as
``__main__``.

Isolation (see ``sandbox``'s docstring for why this design): ``unshare`` new mount, network, PID and
IPC namespaces (and a user namespace when not root), fork so the program is PID 1 of its namespace (this
process waits and exits with its status), then in the child: build a root on a fresh tmpfs holding only
read-only, non-recursive bind mounts of what Python needs, a private ``/tmp`` tmpfs and the writable
work directory; ``pivot_root`` into it and detach the old root, so no path leads back to the host's
filesystem; remount the new root read-only; drop every capability (root also becomes ``nobody``) and
set no-new-privileges. The checks after each step turn any failure into a setup error, never into a
weaker sandbox.
"""

import builtins
import gc
import io
import json
import os
import resource
import signal
import sys

_WRITE_MODE_CHARS = set("wax+")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PROCESS_FUNCTIONS = (
    "fork",
    "forkpty",
    "system",
    "popen",
    "posix_spawn",
    "posix_spawnp",
    "execv",
    "execve",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "kill",
    "killpg",
)
_PATH_MUTATORS = (
    "remove",
    "unlink",
    "rmdir",
    "mkdir",
    "rename",
    "replace",
    "chmod",
    "chown",
    "lchown",
    "symlink",
    "link",
    "truncate",
    "utime",
)
_TWO_PATH_MUTATORS = ("rename", "replace", "symlink", "link")

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_READ, _PR_CAPBSET_DROP = 1, 4, 23, 24
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
# Where a program needs the host's files: system directories (a symlink such as /lib -> usr/lib is
# recreated, a directory bound), the dynamic linker's cache, the time zone. Python's prefixes are added.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
_OPTIONAL_PATHS = ("/etc/localtime",)
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = {"fd": "", "stdin": "/0", "stdout": "/1", "stderr": "/2"}  # to /proc/self/fd...
_LOCKABLE_FLAGS = {os.ST_RDONLY: _MS_RDONLY, os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV}
_LOCKABLE_FLAGS[os.ST_NOEXEC] = _MS_NOEXEC
_NOBODY = 65534


class _Libc:
    """The few libc calls Python 3.11 lacks, raising ``OSError`` on failure."""

    def __init__(self):
        import ctypes

        self._ctypes = ctypes
        self._lib = ctypes.CDLL(None, use_errno=True)

    def __call__(self, name, *args):
        result = getattr(self._lib, name)(*args)
        if result == -1:
            errno = self._ctypes.get_errno()
            raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")
        return result

    def mount(self, source, target, fstype, flags, data=None):
        encode = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
        self("mount", encode[0], encode[1], encode[2], self._ctypes.c_ulong(flags), encode[3])

    def capabilities(self, clear):
        """Clear (or only read) this thread's effective, permitted and inheritable sets; returns them."""
        u32 = self._ctypes.c_uint32
        header = (u32 * 2)(_CAPABILITY_VERSION_3, 0)
        data = (u32 * 6)()
        self("capset" if clear else "capget", header, data)
        return tuple(data)


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare_and_fork(libc, user_namespace, status_fd):
    """New namespaces; returns in the child (PID 1 of the new PID namespace), never in this process."""
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
    libc("unshare", flags | (_CLONE_NEWUSER if user_namespace else 0))
    if user_namespace:  # keep our identity inside: no uid 0, so exec never grants capabilities
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    gc.freeze()  # the collector then leaves the inherited objects alone: fewer copy-on-write faults
    pid = os.fork()
    if pid == 0:
        return
    os.close(status_fd)  # only the child reports
    _exit_like(pid)


def _exit_like(pid):
    """Wait for ``pid`` and end this process the same way, so the caller sees its return code."""
    code = 125
    try:
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            code = 128 + sig  # a signal whose default action does not terminate
        else:
            code = os.waitstatus_to_exitcode(status) & 0xFF
    finally:
        os._exit(code)


def _bind(libc, source, target, writable=False, devices=False):
    """Bind ``source`` (its own mount only, no submounts) at ``target``, read-only unless ``writable``."""
    libc.mount(source, target, None, _MS_BIND)
    flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID | (0 if devices else _MS_NODEV)
    flags |= 0 if writable else _MS_RDONLY
    # A user namespace may not clear flags the source mount has; keep them (they only restrict).
    host_flags = os.statvfs(source).f_flag
    flags |= sum(ms for st, ms in _LOCKABLE_FLAGS.items() if host_flags & st)
    libc.mount(None, target, None, flags)


def _expose(libc, path, new_root):
    """Make the host's ``path`` visible read-only at the same place under ``new_root``."""
    target = new_root + path
    if os.path.islink(path):
        if not os.path.lexists(target):  # else visible already, through an exposed directory
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "x").close()
    _bind(libc, path, target)


def _exposed_paths(config):
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths = [p for p in _OPTIONAL_PATHS if os.path.lexists(p)] + list(config["readonly_paths"])
    paths += [p for p in _SYSTEM_PATHS if os.path.lexists(p)]
    return sorted({os.path.abspath(p) for p in paths} | {os.path.abspath(p) for p in prefixes})


def _build_root(libc, config):
    """Mount the program's filesystem on ``config["new_root"]`` and pivot into it."""
    new_root, work = config["new_root"], config["work"]
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
    libc.mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    os.mkdir(new_root + "/tmp")
    tmp_options = f"mode=1777,size={config['tmp_bytes']}"
    libc.mount("tmpfs", new_root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, tmp_options)
    exposed = _exposed_paths(config)
    identities = {p: os.stat(p)[1:3] for p in exposed}  # (inode, device), checked after the pivot
    for path in exposed:
        _expose(libc, path, new_root)
    os.mkdir(new_root + "/dev")
    for name in _DEVICES:
        open(f"{new_root}/dev/{name}", "x").close()
        _bind(libc, f"/dev/{name}", f"{new_root}/dev/{name}", devices=True)
    for name, fd in _DEV_LINKS.items():
        os.symlink("/proc/self/fd" + fd, f"{new_root}/dev/{name}")
    os.mkdir(new_root + "/proc")
    libc.mount("proc", new_root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY)
    os.makedirs(new_root + work, exist_ok=True)
    _bind(libc, work, new_root + work, writable=True)
    os.chdir(new_root)
    libc("pivot_root", b".", b".")
    libc("umount2", b".", _MNT_DETACH)  # the old root: gone from this namespace, no path leads to it
    os.chdir("/")
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(work)
    for path, identity in identities.items():
        if os.stat(path)[1:3] != identity:
            raise OSError(f"{path} is not the host's {path} inside the sandbox (a submount?)")


def _drop_privileges(libc, user_namespace):
    """No capabilities in any set, no way to gain them (root also becomes ``nobody``)."""
    last_cap = 0
    while libc._lib.prctl(_PR_CAPBSET_READ, last_cap + 1, 0, 0, 0) >= 0:
        last_cap += 1
    for cap in range(last_cap + 1):
        libc("prctl", _PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc("prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if not user_namespace:
        os.setgroups([])
        os.setresgid(_NOBODY, _NOBODY, _NOBODY)
        os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    libc.capabilities(clear=True)
    libc("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc("prctl", _PR_SET_DUMPABLE, 1, 0, 0, 0)  # setresuid cleared it; /proc/self stays the program's
    libc("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # credential changes cleared it too
    held = [cap for cap in range(last_cap + 1) if libc("prctl", _PR_CAPBSET_READ, cap, 0, 0, 0)]
    if any(libc.capabilities(clear=False)) or held or os.geteuid() == 0:
        raise OSError(f"capabilities still held after dropping them (bounding set: {held})")


def _isolate(config, status_fd):
    """Enter the namespaces and the read-only root (see the module docstring); returns the layers."""
    libc = _Libc()
    user_namespace = os.geteuid() != 0
    os.umask(0o022)
    _unshare_and_fork(libc, user_namespace, status_fd)
    libc("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the waiting parent is killed: so are we
    if not user_namespace:
        os.chown(config["work"], _NOBODY, _NOBODY)
    _build_root(libc, config)
    _drop_privileges(libc, user_namespace)
    identity = "user-namespace" if user_namespace else "uid-nobody"
    return ["mount-namespace", "network-namespace", "pid-namespace", "ipc-namespace", identity]


def _set_limits(config):
    cpu = config["cpu_s"]
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_NPROC: (config["max_processes"],) * 2,
        resource.RLIMIT_FSIZE: (config["max_file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (config["max_open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _denied(name):
    def deny(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")

    return deny


def _inside(roots, path):
    if isinstance(path, int):  # an already-open descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _install_guards(private_tmp):
    """Python-level guards: defence in depth only; code that tries hard gets past them."""
    roots = [os.path.realpath(os.getcwd())] + (["/tmp"] if private_tmp else [])

    import _io
    import _posixsubprocess
    import _socket
    import posix
    import socket
    import subprocess

    for module in (os, posix):
        for name in _PROCESS_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, _denied(f"os.{name}"))
    _posixsubprocess.fork_exec = _denied("process creation")
    subprocess.Popen = _denied("subprocess")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(module, name):
                setattr(module, name, _denied(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing"):
        sys.modules[name] = None  # import raises ImportError

    real_open, real_os_open, real_file_io = builtins.open, os.open, _io.FileIO

    def refuse_write(path, mode):
        if _WRITE_MODE_CHARS & set(mode) and not _inside(roots, path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")

    def guarded_open(file, mode="r", *args, **kwargs):
        refuse_write(file, mode)
        return real_open(file, mode, *args, **kwargs)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            refuse_write(file, mode)
            super().__init__(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and (kwargs.get("dir_fd") is not None or not _inside(roots, path)):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open

    for name in _PATH_MUTATORS:
        real = getattr(os, name)

        def guarded(*args, _real=real, _name=name, **kwargs):
            paths = args[:2] if _name in _TWO_PATH_MUTATORS else args[:1]
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(f"sandbox: os.{_name} relative to a directory descriptor")
            for path in paths:
                if not _inside(roots, path):
                    raise PermissionError(f"sandbox: os.{_name} on {path!r} outside the working directory")
            return _real(*args, **kwargs)

        setattr(os, name, guarded)
        setattr(posix, name, guarded)


def main():
    config = json.loads(sys.argv[1])
    status_fd = config["status_fd"]
    try:
        if config["cgroup_procs"]:
            _write_file(config["cgroup_procs"], str(os.getpid()))
        layers = _isolate(config, status_fd) if config["isolate"] else []
        _set_limits(config)
        if config["guard"]:
            _install_guards(private_tmp=config["isolate"])
        os.write(status_fd, json.dumps({"layers": layers}).encode())
    except Exception as exc:
        os.write(status_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        raise SystemExit(125) from exc
    finally:
        os.close(status_fd)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    del sys.argv[1:]
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
