"""``--estimate-memory`` (fake tensors, fake process group) against ``--measure-memory`` (the same steps on
real tensors, 2 gloo ranks, the CPU allocator's peak), and the estimator's pieces."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wmtp_kernels._linear_pass import default_chunk_rows
from wmtp_train.config_files import load_recipe
from wmtp_train.model import resolve_args
from wmtp_train.train.memory import estimation_config, loss_workspace_bytes, synthetic_batch
from wmtp_train.train.metrics import prediction_counts

MICRO = ["--recipe", "verifiable", "--preset", "micro", "--set", "run.device=cpu"]


def _cli(args, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, "-m", "wmtp_train", *args], env=env, capture_output=True, text=True)
    return proc


def _row(report: str, label: str) -> list[float]:
    line = next(line for line in report.splitlines() if line.startswith(label))
    return [float(x) for x in line[len(label) :].split()]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_estimate_is_within_ten_percent_of_the_measured_two_rank_peak(checkpointing):
    args = [*MICRO, "--set", f"parallel.activation_checkpoint={checkpointing}"]
    estimate = _cli([*args, "--estimate-memory", "--world-size", "2"])
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    measured = _cli([*args, "--measure-memory"], nproc=2)
    assert measured.returncode == 0, measured.stdout[-3000:] + measured.stderr[-3000:]
    estimated_peaks = _row(estimate.stdout, "estimated peak")
    measured_peaks = _row(measured.stdout, "measured peak (allocator)")
    assert len(estimated_peaks) == len(measured_peaks) == 2  # stage 1, stage 2
    for est, real in zip(estimated_peaks, measured_peaks):
        assert est == pytest.approx(real, rel=0.10)
    # On real tensors the tracker sees what it sees on fake ones: the same split, to the byte shown.
    assert _row(estimate.stdout, "activations") == _row(measured.stdout, "activations")
    assert _row(estimate.stdout, "optimizer state") == _row(measured.stdout, "optimizer state")


def test_estimate_cli_refuses_what_it_cannot_estimate():
    proc = _cli([*MICRO, "--estimate-memory"])
    assert proc.returncode == 2 and "--world-size" in proc.stderr
    proc = _cli(["--recipe", "rho1_weighted", "--preset", "micro", "--estimate-memory", "--world-size", "2"])
    assert proc.returncode == 2 and "rho1" in proc.stderr


def test_estimation_config_spells_out_the_device_choices():
    config = load_recipe("verifiable", ["parallel.compile=true"])
    cuda = estimation_config(config, "cuda")
    assert (cuda.parallel.mixed_precision, cuda.parallel.compile, cuda.run.device) == ("bf16", False, "cuda")
    assert estimation_config(config, "cpu").parallel.mixed_precision == "none"
    assert config.parallel.mixed_precision == "auto" and config.parallel.compile  # a copy


def test_synthetic_batch_trains_every_token_after_bos():
    args = resolve_args("micro")
    batch = synthetic_batch(args, 3, 10, seed=1)
    assert batch["input_ids"].shape == (3, 10) and int(batch["input_ids"].max()) < args.vocab_size
    assert (
        batch["attention_mask"].all()
        and batch["loss_mask"][:, 1:].all()
        and not batch["loss_mask"][:, 0].any()
    )
    assert batch["rewards"].tolist() == [1.0, 0.0, 1.0]
    # head k predicts labels[t + k] from t = 0 .. T - 1 - k: T - k rows per head and sequence
    assert int(prediction_counts(batch["labels"], batch["attention_mask"], 4).sum()) == 3 * (9 + 8 + 7 + 6)


def test_loss_workspace_follows_the_kernel_chunk_budget():
    args = resolve_args("7b_1t_4")
    # CUDA, bf16: at most 3072 rows per chunk (448 MiB would be 7340 rows of V = 32000), balanced over the
    # rows; two [C, d] buffers
    rows = 4 * 2048 * 4
    chunk = -(-rows // -(-rows // 3072))
    expected = chunk * (32000 + 2 * 4096) * 2 + rows * 80
    assert loss_workspace_bytes(args, rows, torch.bfloat16, "cuda") == expected
    # fewer rows than a chunk: the chunk is the rows
    assert loss_workspace_bytes(args, 100, torch.float32, "cpu") == 100 * (32000 + 3 * 4096) * 4 + 100 * 80


def test_cpu_default_chunk_is_the_byte_budget_but_never_under_192_rows():
    # 64 MiB of float32 logits: 524 rows at V = 32000; at V = 128256 the budget's 130 rows are raised to
    # the 192-row floor (smaller chunks make every GEMM of the CPU loop slower)
    assert default_chunk_rows(32000, 4, "cpu") == 64 * 2**20 // (32000 * 4) == 524
    assert default_chunk_rows(128256, 4, "cpu") == 192
    assert default_chunk_rows(128256, 4, "mps") == 192  # other device types get the CPU's rule


GPU_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_7b_step.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the real 7B-width step")
def test_gpu_script_says_so_in_one_line_without_cuda():
    proc = subprocess.run([sys.executable, str(GPU_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().count("\n") == 0
    assert proc.stdout.startswith("gpu_7b_step: skipped (no CUDA device)")


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu():
    """The GPU check's whole path (estimate, then the measured steps on a one-rank group) at micro width."""
    args = [sys.executable, str(GPU_SCRIPT), "--dry-run", "--seq", "32", "--batch", "2"]
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_7b_step: micro_5_layers, 2 x 32, cpu (dry run): stage1 estimate")
    assert last.endswith("within 10 %")


def test_cuda_estimate_holds_the_foreach_adamw_temporary():
    """On CUDA AdamW runs ``foreach``: its step holds one more tensor the size of the parameter shard
    (``exp_avg_sq``'s square root). The estimate's fake tensors live on the CPU, where PyTorch would pick
    the loop over tensors, so the trainer names the implementation by the run's device."""
    small_activations = ["data.max_len=16", "stage2.micro_batch_size=1"]
    small_activations.append("parallel.activation_checkpoint=full")
    args = ["--recipe", "verifiable", "--preset", "micro", "--estimate-memory", "--world-size", "1"]
    for setting in small_activations:  # so that the optimizer step is the peak
        args += ["--set", setting]
    cpu, cuda = (_cli([*args, "--set", f"run.device={device}"]) for device in ("cpu", "cuda"))
    assert cpu.returncode == 0 and cuda.returncode == 0, cpu.stderr[-2000:] + cuda.stderr[-2000:]
    moments = _row(cpu.stdout, "optimizer state")[1]  # stage 2, MiB: two float32 tensors per parameter
    assert _row(cuda.stdout, "optimizer state")[1] == pytest.approx(1.5 * moments, rel=0.02)
