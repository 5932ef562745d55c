"""Trainer under ``torchrun --nproc_per_node=2`` (gloo, FSDP2): recipes, 1-rank vs 2-rank equality, resume,
and a rank killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_utils import tiny_overrides, write_tiny_jsonl

pytestmark = pytest.mark.distributed

# Same global batch (8 samples per stage-2 step, 4 per stage-1 step) split differently.
TWO_RANKS = {"stage1.micro_batch_size": 2, "stage2.micro_batch_size": 2, "stage2.grad_accum": 2}
ONE_RANK = {"stage1.micro_batch_size": 4, "stage2.micro_batch_size": 4, "stage2.grad_accum": 2}
TIMEOUT = 240


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def launch(recipe, out, data, nproc, extra=None, resume=False, wait=True):
    overrides = tiny_overrides(out, data, **{**(TWO_RANKS if nproc == 2 else ONE_RANK), **(extra or {})})
    cli = ["-m", "wmtp_train", "--recipe", recipe]
    for item in overrides:
        cli += ["--set", item]
    if resume:
        cli.append("--resume")
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cli,
        ]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


POOLED_STATS = ("weight_mean", "weight_std", "weight_min", "weight_max", "weight_entropy", "td_min", "td_max",
                "td_std", "ce_head1", "ce_head4", "explained_variance")  # fmt: skip


def step_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "step" in row and "grad_norm" in row}


def step_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {}
    for row in rows:
        if "step" in row and ("total_loss" in row or "value_loss" in row) and "grad_norm" in row:
            losses[row["step"]] = row.get("total_loss", row.get("value_loss"))
    return losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl")


@pytest.fixture(scope="module")
def two_rank_verifiable(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    launch("verifiable", out, data, 2)
    return out


@pytest.mark.parametrize("recipe", ["baseline", "rho1_weighted"])
def test_recipe_runs_on_two_ranks(recipe, data, tmp_path):
    proc = launch(recipe, tmp_path, data, 2)
    losses = step_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1]
    assert "[stage2] 4/4" in proc.stdout
    assert (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").is_file()


def test_two_ranks_match_one_rank_with_the_same_global_batch(two_rank_verifiable, data, tmp_path):
    """Tolerance: relative 1e-5 per step (same samples, only the float summation order differs)."""
    launch("verifiable", tmp_path, data, 1)
    one, two = step_losses(tmp_path), step_losses(two_rank_verifiable)
    assert sorted(one) == sorted(two) == list(range(1, 8))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert (two_rank_verifiable / "checkpoints" / "step_00000007").is_dir()
    # Statistics are over the step's tokens on all ranks: true extremes (MIN / MAX all-reduce) and pooled
    # moments, whatever the split into ranks and micro-batches.
    one, two = step_rows(tmp_path), step_rows(two_rank_verifiable)
    for step in range(4, 8):  # stage 2
        for key in POOLED_STATS:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6, nan_ok=True), (
                step,
                key,
            )


def test_two_rank_resume_reproduces_the_uninterrupted_run(two_rank_verifiable, data, tmp_path):
    launch("verifiable", tmp_path, data, 2, extra={"run.max_steps": 5})
    assert sorted(step_losses(tmp_path)) == [1, 2, 3, 4, 5]
    launch("verifiable", tmp_path, data, 2, resume=True)
    resumed, full = step_losses(tmp_path), step_losses(two_rank_verifiable)
    assert resumed == full  # bitwise: gloo reductions are deterministic on CPU


def test_sigkill_of_a_rank_then_resume(data, tmp_path):
    """Kill rank 1 while checkpoints are being written; relaunch with --resume; compare to a clean run."""
    extra = {"stage2.steps": 12, "checkpoint.every": 1, "checkpoint.keep": 2}
    clean = tmp_path / "clean"
    launch("baseline", clean, data, 2, extra=extra)
    out = tmp_path / "killed"
    proc = launch("baseline", out, data, 2, extra=extra, wait=False)
    deadline = time.time() + TIMEOUT
    victim = None
    while time.time() < deadline and victim is None:
        if (out / "checkpoints" / "step_00000005").is_dir():
            children = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            for pid in children:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"RANK=1" in environ:
                    victim = int(pid)
        time.sleep(0.05)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode != 0
    killed_at = max(step_losses(out))
    assert killed_at < 12
    launch("baseline", out, data, 2, extra=extra, resume=True)
    resumed, full = step_losses(out), step_losses(clean)
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == full


def test_lora_two_rank_resume_is_bitwise(data, tmp_path):
    """LoRA with adapter dropout (so the RNG state matters): a run stopped in stage 2 and resumed gives the
    uninterrupted run's losses and adapters bit for bit; its checkpoints hold no base weight."""
    import torch
    import torch.distributed.checkpoint as dcp

    lora = {"lora.enabled": True, "lora.rank": 4, "lora.dropout": 0.1, "checkpoint.export": True}
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    launch("verifiable", full, data, 2, extra=lora)
    launch("verifiable", stopped, data, 2, extra={**lora, "run.max_steps": 5})
    launch("verifiable", stopped, data, 2, extra=lora, resume=True)
    assert sorted(step_losses(full)) == list(range(1, 8))
    assert step_losses(stopped) == step_losses(full)
    adapters = [
        torch.load(out / "export" / "lora_adapters.pth", weights_only=True) for out in (full, stopped)
    ]
    assert adapters[0]["state_dict"].keys() == adapters[1]["state_dict"].keys()
    for key, value in adapters[0]["state_dict"].items():
        assert torch.equal(value, adapters[1]["state_dict"][key]), key
    reader = dcp.FileSystemReader(str(stopped / "checkpoints" / "step_00000007"))
    saved = {key for key in reader.read_metadata().state_dict_metadata if key.startswith("app.model.")}
    assert "app.model.layers.0.attention.wq.lora_a.weight" in saved
    assert all(".lora_" in key or key.startswith("app.model.value_head.") for key in saved), sorted(saved)
