"""FSDP2-sharded (DTensor) ``lm_head_weight``: refused with a clear error; the two documented patterns
give the single-process gradient. Two gloo ranks under ``torchrun``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_dtensor_weight_is_refused_and_documented_patterns_are_exact():
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" OK") == 2, done.stdout
