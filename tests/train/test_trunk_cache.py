"""Stage 1 on cached frozen trunk states (``stage1.cache_trunk_states``); the hazard head in runs."""

import math

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.model import load_meta_checkpoint
from wmtp_train.train.trainer import Trainer

N_RECORDS, BATCH = 48, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", n=N_RECORDS)


def value_head_after_stage1(data, out, cache: bool, steps: int = 3):
    trainer = Trainer(
        tiny_config(
            "verifiable",
            out,
            data,
            **{"stage1.cache_trunk_states": cache, "model.value_head": "hazard", "stage1.lr": 0.05},
        )
    )
    calls = []
    run_trunk = trainer.model._run_trunk
    trainer.model._run_trunk = lambda *a: calls.append(a[0].shape[0]) or run_trunk(*a)
    stage = trainer.stages["stage1"]
    stage.setup(trainer.data.train.index)
    per_step = []
    for _ in range(steps):
        before = len(calls)
        stage.step([trainer.data.batch(indices) for indices in stage.next_indices()])
        per_step.append(len(calls) - before)
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    head = {k: v.detach().clone() for k, v in sd.items() if k.startswith("value_head.")}
    return head, calls, per_step


def test_cached_stage1_trains_the_value_head_as_the_uncached_one(data, tmp_path):
    plain, _, plain_calls = value_head_after_stage1(data, tmp_path / "plain", cache=False)
    cached, calls, per_step = value_head_after_stage1(data, tmp_path / "cached", cache=True)
    assert plain_calls == [1, 1, 1]  # the trunk runs at every step without the cache
    # With it: every record once, in batches of stage1.micro_batch_size, before the first step; then never.
    assert sum(calls) == N_RECORDS and len(calls) == math.ceil(N_RECORDS / BATCH)
    assert per_step == [len(calls), 0, 0]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in cached.items() if "proj" in k)
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-6)


def test_cache_needs_a_frozen_trunk(data, tmp_path):
    with pytest.raises(ValueError, match="cache_trunk_states needs a frozen trunk"):
        tiny_config(
            "verifiable",
            tmp_path,
            data,
            **{"stage1.cache_trunk_states": True, "stage1.unfreeze_trunk": True},
        )
    with pytest.raises(ValueError, match="model.value_head must be one of"):
        tiny_config("verifiable", tmp_path, data, **{"model.value_head": "hazrd"})


def test_a_verifiable_run_with_the_hazard_head_exports_it(data, tmp_path):
    config = tiny_config(
        "verifiable",
        tmp_path / "run",
        data,
        **{"model.value_head": "hazard", "stage1.cache_trunk_states": True, "checkpoint.export": True},
    )
    result = Trainer(config).fit()
    assert result["finished"]
    stage2 = [h for h in result["history"] if h["stage"] == 2.0]
    assert all(math.isfinite(h["total_loss"]) and math.isfinite(h["value_loss"]) for h in stage2)
    model, args = load_meta_checkpoint(tmp_path / "run" / "export")
    assert args.value_head == "hazard"
    assert not torch.equal(
        model.value_head.hazard_proj.weight, torch.zeros_like(model.value_head.hazard_proj.weight)
    )


def test_stage2_value_snapshot_applies_the_completion_mask(data, tmp_path):
    trainer = Trainer(tiny_config("verifiable", tmp_path / "run", data, **{"model.value_head": "hazard"}))
    torch.nn.init.zeros_(trainer.model.value_head.hazard_proj.bias)  # ln 2 per token: the mask matters
    stage = trainer.stages["stage2"]
    stage.setup(trainer.data.train.index)
    batch = trainer.data.batch([0, 1, 2])
    out = trainer.model(
        batch["input_ids"], batch["attention_mask"], trunk_only=True, value_mask=batch["loss_mask"]
    )
    torch.testing.assert_close(stage.old_values(out.trunk, batch["loss_mask"]), out.values.float())
