"""Every Triton kernel of the package compiles ahead of time for sm_80 and sm_90 (no GPU needed).

The compile runs in a subprocess without ``TRITON_INTERPRET``: kernels decorated under the interpreter
(as the parity tests need) cannot be compiled, and the environment variable is read at decoration time.
"""

import json
import os
import subprocess
import sys

import pytest

from wmtp_kernels._aot import ARCHS, kernel_specs


@pytest.fixture(scope="module")
def compile_reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "wmtp_kernels._aot"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"ahead-of-time compile failed:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout)


def test_every_specialisation_compiles_for_every_arch(compile_reports):
    want = {(spec.label, arch) for spec in kernel_specs() for arch in ARCHS}
    got = {(r["specialisation"], r["arch"]) for r in compile_reports}
    assert got == want
    assert len(compile_reports) == len(want)


def test_compiled_kernels_have_code_and_do_not_spill(compile_reports):
    for report in compile_reports:
        where = f"{report['kernel']} [{report['specialisation']}] sm_{report['arch']}"
        assert report["ptx_chars"] > 0 and report["cubin_bytes"] > 0, where
        assert 0 < report["registers"] <= 255, where
        assert report["local_bytes"] == 0, f"{where} uses {report['local_bytes']} bytes of local memory"
