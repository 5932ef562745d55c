"""Whether this kernel lets us create the sandbox's namespaces, asked independently of the sandbox.

The sandbox's own probe cannot decide which tests to skip: a broken sandbox would read as "unavailable"
and skip the very tests that should catch it. This asks the kernel directly (``unshare`` through
ctypes in a throwaway process); where it succeeds, the sandbox must isolate, or the tests fail.
"""

import functools
import subprocess
import sys

_PROBE = """
import ctypes, os, sys
flags = 0x00020000 | 0x08000000 | 0x20000000 | 0x40000000  # mount, IPC, PID, network
if os.geteuid() != 0:
    flags |= 0x10000000  # and a user namespace
sys.exit(0 if ctypes.CDLL(None, use_errno=True).unshare(flags) == 0 else 1)
"""


@functools.cache
def kernel_allows_namespaces() -> bool:
    probe = subprocess.run([sys.executable, "-I", "-c", _PROBE], capture_output=True, timeout=30)
    return probe.returncode == 0
