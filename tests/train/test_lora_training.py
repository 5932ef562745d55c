"""LoRA runs of the trainer (one rank, FSDP2 on, micro model): what trains, the loss, the export, the
checkpoint's size and its frozen base."""

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.model import LoRAOptions, apply_lora, build_model, load_lora_adapters, load_meta_checkpoint
from wmtp_train.model.lora import LoRALinear
from wmtp_train.train.checkpoint import CheckpointError
from wmtp_train.train.step import Stage
from wmtp_train.train.trainer import Trainer

LORA = {"lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl")


def full_state(model):
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    """verifiable (stage 1, then stage 2) with LoRA on both parts, the output head trained, adapters on
    the heads' attention only; records which parameters had a gradient at every optimizer step."""
    out = tmp_path_factory.mktemp("lora")
    extra = {**LORA, "lora.head_targets": "wq,wk,wv,wo", "lora.train_output_head": True}
    cfg = tiny_config("verifiable", out, data, **extra, **{"stage2.steps": 6, "checkpoint.export": True})
    trainer = Trainer(cfg)
    before = full_state(trainer.model)
    with_grad = []
    original = Stage._clip_gradients  # runs once per optimizer step, after the backward passes

    def spy(stage):
        with_grad.append(
            (stage.name, {n for n, p in stage.ctx.model.named_parameters() if p.grad is not None})
        )
        return original(stage)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Stage, "_clip_gradients", spy)
        result = trainer.fit()
    return trainer, before, full_state(trainer.model), with_grad, result, out


def test_only_adapters_and_the_chosen_parts_get_gradients(lora_run):
    trainer, _, after, with_grad, _, _ = lora_run
    adapters = {k for k in after if ".lora_" in k}
    value_head = {k for k in after if k.startswith("value_head.")}
    output_head = {k for k in after if k.startswith("head.")}
    trunk_adapters = {
        k for k in adapters if k.split(".")[1] in ("0", "1", "2", "3") and k.startswith("layers.")
    }
    assert len(adapters) == 2 * (7 * 4 + 4 * 4)  # trunk: all seven projections; heads: attention only
    stages = [name for name, _ in with_grad]
    assert stages == ["stage1"] * 3 + ["stage2"] * 6
    for name, names in with_grad:
        if name == "stage1":  # unfreeze_trunk is off: the value head alone
            assert names == value_head
        else:
            assert names == adapters | value_head | output_head
    assert trunk_adapters < adapters


def test_only_trained_parameters_change_and_every_adapter_moves(lora_run):
    _, before, after, _, _, _ = lora_run
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    options = LoRAOptions(enabled=True, train_output_head=True)
    assert all(options.is_trained(k) for k in changed), sorted(
        k for k in changed if not options.is_trained(k)
    )
    # B starts at zero (so A's first gradient is zero); after six stage-2 steps both have moved.
    assert {k for k in before if ".lora_" in k} <= changed
    assert {"head.norm.weight", "head.output.weight", "value_head.hidden.weight"} <= changed


def test_the_loss_falls(lora_run):
    history = lora_run[4]["history"]
    stage2 = [h["mtp_loss"] for h in history if h["stage"] == 2.0]
    assert len(stage2) == 6 and stage2[-1] < stage2[0] - 0.1


def test_merged_export_and_adapters_file_equal_the_adapted_model(lora_run):
    trainer, _, after, _, _, out = lora_run
    adapted = build_model(trainer.builder.args, device="cpu")
    apply_lora(adapted, trainer.config.lora)
    adapted.load_state_dict(after)
    merged, _ = load_meta_checkpoint(out / "export", dtype=torch.float32)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    base = build_model(trainer.builder.args, device="meta")
    base.load_state_dict(trainer.builder.initial_state(""), assign=True)
    assert load_lora_adapters(base, out / "export") == trainer.config.lora
    ids = torch.randint(0, 260, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = adapted.full_forward(ids, return_logits=True)
        for model in (merged, base):
            got = model.full_forward(ids, return_logits=True)
            torch.testing.assert_close(got.logits, reference.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.values, reference.values, rtol=0, atol=1e-5)


def test_resume_on_another_base_is_refused(lora_run, data, tmp_path):
    trainer, *_ = lora_run
    checkpoint = trainer.checkpointer.manager.complete_steps()[0][1]
    extra = {**LORA, "lora.head_targets": "wq,wk,wv,wo", "lora.train_output_head": True}
    cfg = tiny_config("verifiable", tmp_path, data, **extra, **{"stage2.steps": 6, "run.seed": 1})
    with pytest.raises(CheckpointError, match="frozen base differs"):
        Trainer(cfg, resume=str(checkpoint)).fit()


def checkpoint_bytes(out: Path) -> int:
    step = sorted((out / "checkpoints").iterdir())[-1]
    return sum(path.stat().st_size for path in step.iterdir())


def test_lora_checkpoint_is_ten_times_smaller(data, tmp_path):
    sizes = {}
    for name, extra in (("full", {}), ("lora", {**LORA, "lora.rank": 2})):
        cfg = tiny_config("baseline", tmp_path / name, data, **extra, **{"stage2.steps": 2})
        Trainer(cfg).fit()
        sizes[name] = checkpoint_bytes(tmp_path / name)
    # On the micro model (d = 128) rank 2 is what 10x takes: adapters + value head are 3.5% of the
    # parameters, and each of the ~580 saved tensors carries ~1.5 kB of file overhead.
    assert sizes["full"] >= 10 * sizes["lora"], sizes


def test_rho1_reference_is_the_unadapted_base(data, tmp_path):
    trainer = Trainer(tiny_config("rho1_weighted", tmp_path, data, **LORA))
    reference = trainer.stages["stage2"].weighting.reference
    assert not any(isinstance(m, LoRALinear) for m in reference.modules())
    assert any(isinstance(m, LoRALinear) for m in trainer.model.modules())
    base = trainer.builder.initial_state("")
    assert all(torch.equal(base[k], v) for k, v in full_state(reference).items())
