"""Entry point of a sandboxed program; run by ``sandbox.run_program`` as ``python -I <this> CONFIG``.

Standard library only (it runs isolated, without the project on ``sys.path``). In order, before any
user code: join the pids cgroup if one is given, set the resource limits (soft = hard, so the program
cannot raise them without privileges), read ``program.py`` from the working directory, install the
Python-level guards if asked, then execute the program as ``__main__``.

The guards are defence in depth, not a security boundary: code that tries hard can undo in-process
patches. The kernel-side layers (namespaces, cgroup, rlimits, the wall-clock kill) are set up outside.
"""

import builtins
import io
import json
import os
import resource
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


def _inside(root, path):
    if isinstance(path, int):  # an already-open descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)


def _install_guards():
    root = os.path.realpath(os.getcwd())

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

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if _WRITE_MODE_CHARS & set(mode) and not _inside(root, file):
            raise PermissionError(f"sandbox: writing {file!r} outside the working directory")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and (kwargs.get("dir_fd") is not None or not _inside(root, path)):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open

    for name in _PATH_MUTATORS:
        real = getattr(os, name)

        def guarded(*args, _real=real, _name=name, **kwargs):
            for path in args[:2] if _name in ("rename", "replace", "symlink", "link") else args[:1]:
                if not _inside(root, path):
                    raise PermissionError(f"sandbox: os.{_name} on {path!r} outside the working directory")
            return _real(*args, **kwargs)

        setattr(os, name, guarded)


def main():
    config = json.loads(sys.argv[1])
    if config["cgroup_procs"]:
        with open(config["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    _set_limits(config)
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    del sys.argv[1:]
    if config["guard"]:
        _install_guards()
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
