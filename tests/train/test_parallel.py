"""``[parallel]``: activation checkpointing (2 ranks), per-block ``torch.compile`` against eager, and bf16
mixed precision across the stages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.config_files import load_recipe
from wmtp_train.model import build_model
from wmtp_train.train.memory import LossOpCounter
from wmtp_train.train.parallelize import (
    checkpointed_blocks,
    transformer_blocks,
)
from wmtp_train.train.trainer import train

WORKER = Path(__file__).with_name("step_worker.py")


def test_checkpointed_blocks_are_the_documented_subsets():
    model = build_model("micro", device="meta")
    blocks = transformer_blocks(model)
    assert blocks == [*model.layers, *model.extra_heads] and len(blocks) == 8
    assert checkpointed_blocks(model, "none") == []
    assert checkpointed_blocks(model, "full") == blocks
    assert checkpointed_blocks(model, "selective") == blocks[0::2]
    with pytest.raises(ValueError, match="activation_checkpoint"):
        load_recipe("baseline", ["parallel.activation_checkpoint=some"])


def run_steps(tmp_path, recipe, variants, nproc=1):
    """:mod:`step_worker`'s results for each variant (one process, or ``nproc`` under torchrun)."""
    out = tmp_path / "results.pt"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*launcher, str(WORKER), str(out), recipe, *variants], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def assert_same_step(result, reference, rtol, atol):
    assert result["loss"] == pytest.approx(reference["loss"], rel=rtol)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.distributed
def test_activation_checkpointing_on_two_ranks_recomputes_blocks_not_the_loss(tmp_path):
    """Same loss and gradients (bitwise here: the recomputation repeats the same fp32 kernels); every
    checkpointed block runs twice per micro-batch, the fused loss once (its forward already computes its
    gradients, so a recomputation would be a whole wasted pass over the vocabulary)."""
    modes = {mode: f"parallel.activation_checkpoint={mode}" for mode in ("none", "full", "selective")}
    results = run_steps(tmp_path, "verifiable", list(modes.values()), nproc=2)
    reference = results[modes["none"]]
    assert reference["block_calls"] == [2] * 8  # two micro-batches
    expected_blocks = {"full": [4] * 8, "selective": [4, 2] * 4}
    for mode in ("full", "selective"):
        result = results[modes[mode]]
        assert result["loss_calls"] == reference["loss_calls"] == 2
        assert result["block_calls"] == expected_blocks[mode]
        assert_same_step(result, reference, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path):
    """Inductor fuses and reorders float32 arithmetic, so agreement is to a relative 1e-4, not bitwise."""
    eager, compiled = "parallel.compile=false", "parallel.compile=true"
    checkpointed = f"{compiled},parallel.activation_checkpoint=full"
    results = run_steps(tmp_path, "verifiable", [eager, compiled, checkpointed])
    assert results[compiled]["block_calls"] == results[eager]["block_calls"] == [2] * 8
    assert (
        results[checkpointed]["block_calls"] == [4] * 8
    )  # the checkpoint hooks stay around the compiled forward
    for variant in (compiled, checkpointed):
        assert_same_step(results[variant], results[eager], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_trains_stage2_after_stage1(tmp_path):
    """FSDP2 fixes each group's gradient dtypes at its first forward; stage 1 runs with the trunk and the
    heads frozen, so without re-deriving them stage 2 reduced bf16 gradients into fp32 parameters and
    failed at the first backward (the default on CUDA)."""
    data = write_tiny_jsonl(tmp_path / "tiny.jsonl")
    config = tiny_config("verifiable", tmp_path / "out", data, **{"parallel.mixed_precision": "bf16"})
    history = train(config)["history"]
    stage2 = [row for row in history if row["stage"] == 2.0]
    assert len(stage2) == config.stage2.steps
    assert all(torch.isfinite(torch.tensor(row["total_loss"])) for row in stage2)


def test_loss_op_counter_counts_forward_calls_only():
    from wmtp_kernels import fused_weighted_mtp_loss

    hidden = torch.randn(1, 6, 2, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (1, 6))
    with LossOpCounter() as counter:
        fused_weighted_mtp_loss(hidden, weight, labels).backward()
        fused_weighted_mtp_loss(hidden, weight, labels)
    assert counter.calls == 2
    assert counter.held == (1 * 6 * 2 * 8 + 20 * 8) * 4 + 2 * 8 + 4  # d hidden, d W, head CE, loss
