"""``[parallel]``: activation checkpointing (2 ranks), per-block ``torch.compile`` against eager, and bf16
mixed precision across the stages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.config import load_recipe
from wmtp_train.data.tokenizer import load_tokenizer
from wmtp_train.model import build_model
from wmtp_train.train.memory import LossOpCounter, synthetic_batch
from wmtp_train.train.model_builder import ModelBuilder
from wmtp_train.train.parallelize import checkpointed_blocks, full_tensor, init_distributed, transformer_blocks
from wmtp_train.train.stages import build_stages
from wmtp_train.train.step import StageContext, TrainerState
from wmtp_train.train.trainer import train

WORKER = Path(__file__).with_name("checkpointing_worker.py")


def test_checkpointed_blocks_are_the_documented_subsets():
    model = build_model("micro", device="meta")
    blocks = transformer_blocks(model)
    assert blocks == [*model.layers, *model.extra_heads] and len(blocks) == 8
    assert checkpointed_blocks(model, "none") == []
    assert checkpointed_blocks(model, "full") == blocks
    assert checkpointed_blocks(model, "selective") == blocks[0::2]
    with pytest.raises(ValueError, match="activation_checkpoint"):
        load_recipe("baseline", ["parallel.activation_checkpoint=some"])


@pytest.mark.distributed
def test_activation_checkpointing_on_two_ranks_recomputes_blocks_not_the_loss(tmp_path):
    """Same loss and gradients (bitwise here: the recomputation repeats the same fp32 kernels); every
    checkpointed block runs twice per micro-batch, the fused loss once (its forward already computes its
    gradients, so a recomputation would be a whole wasted pass over the vocabulary)."""
    out = tmp_path / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run([*cmd, str(out), "none", "full", "selective"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out)
    reference = results["none"]
    assert reference["block_calls"] == [2] * 8  # two micro-batches
    expected_blocks = {"full": [4] * 8, "selective": [4, 2] * 4}
    for mode in ("full", "selective"):
        result = results[mode]
        assert result["loss_calls"] == reference["loss_calls"] == 2
        assert result["block_calls"] == expected_blocks[mode]
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _stage2_step(compile_blocks: bool):
    """Loss and gradients of one stage-2 step (baseline recipe, micro model, one rank)."""
    overrides = ["model.preset=micro", "run.device=cpu", f"parallel.compile={str(compile_blocks).lower()}"]
    overrides += ["stage2.micro_batch_size=2", "data.max_len=32", "stage2.max_grad_norm=0"]
    config = load_recipe("baseline", overrides)
    info = init_distributed("cpu")
    builder = ModelBuilder(config, info, load_tokenizer(None).vocab_size)
    model = builder.build("")
    stage = build_stages(StageContext(config, model, builder.args, info, TrainerState(stage="stage2")), builder)
    stage = stage["stage2"]
    stage.prepare()
    grads = {}
    finish = stage._finish_update

    def record_gradients(applied, norm):
        grads.update({n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None})
        finish(applied, norm)

    stage._finish_update = record_gradients
    result = stage.step([synthetic_batch(builder.args, 2, 32, seed=0)])
    return result.metrics["total_loss"], grads


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """Inductor fuses and reorders float32 arithmetic, so agreement is to a relative 1e-4, not bitwise."""
    torch._dynamo.reset()
    eager_loss, eager_grads = _stage2_step(compile_blocks=False)
    compiled_loss, compiled_grads = _stage2_step(compile_blocks=True)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


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
