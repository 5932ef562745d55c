"""Single-process trainer runs (a one-rank gloo group, FSDP2 on), on a tiny JSONL and the micro model."""

import math

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.data.samplers import BalancedSampler, UniformSampler
from wmtp_train.train.trainer import NonFiniteAbort, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl")


def full_state(trainer):
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def losses(result, key="total_loss"):
    return [(h["step"], h.get(key, h.get("value_loss"))) for h in result["history"]]


@pytest.mark.parametrize("recipe", ["baseline", "verifiable", "rho1_weighted"])
def test_recipe_runs_and_learns(recipe, data, tmp_path):
    cfg = tiny_config(recipe, tmp_path / "run", data, **{"stage2.steps": 6})
    result = Trainer(cfg).fit()
    history = result["history"]
    stage2 = [h for h in history if h["stage"] == 2.0]
    assert result["finished"] and len(stage2) == 6
    assert len(history) == (9 if recipe == "verifiable" else 6)
    assert all(math.isfinite(h["total_loss"]) for h in stage2)
    assert stage2[-1]["mtp_loss"] < stage2[0]["mtp_loss"]
    for key in ("ce_head1", "ce_head4", "weight_mean", "grad_norm", "lr", "tokens_per_s", "peak_memory_mb"):
        assert key in stage2[0], key
    step_tokens = [h["tokens_per_s"] * h["step_time_s"] for h in history]  # cumulative "tokens" adds them
    assert [h["tokens"] for h in history] == pytest.approx(np.cumsum(step_tokens).tolist())
    if recipe == "verifiable":
        assert "td_mean" in stage2[0] and "explained_variance" in stage2[0] and "value_loss" in stage2[0]
        assert "stage1_train" in result["evals"]
    if recipe == "rho1_weighted":
        assert stage2[0]["weight_min"] == 0.0  # hard selection: unselected tokens weigh 0
    if recipe == "baseline":
        assert stage2[0]["weight_std"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir() or recipe == "verifiable"


def test_stage1_frozen_updates_only_the_value_head(data, tmp_path):
    cfg = tiny_config("verifiable", tmp_path / "run", data, **{"run.max_steps": 2})
    trainer = Trainer(cfg)
    before = full_state(trainer)
    trainer.fit()
    after = full_state(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("value_head.") for k in changed), sorted(changed)
    assert {k for k in before if k.startswith("value_head.")} - {"value_head.norm.weight"} <= changed


def test_stage1_unfreeze_trunk_moves_the_trunk_but_not_the_heads(data, tmp_path):
    cfg = tiny_config(
        "verifiable", tmp_path / "run", data, **{"run.max_steps": 2, "stage1.unfreeze_trunk": True}
    )
    trainer = Trainer(cfg)
    before = full_state(trainer)
    trainer.fit()
    after = full_state(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("layers.0.") for k in changed)
    assert not any(k.startswith(("extra_heads.", "head.", "layers.4.")) for k in changed)


@pytest.mark.parametrize("sampler", ["balanced", "uniform"])
def test_stage1_sampler_setting_picks_the_stage1_sampler(sampler, data, tmp_path):
    cfg = tiny_config("verifiable", tmp_path / "run", data, **{"stage1.sampler": sampler})
    trainer = Trainer(cfg)
    picked = trainer.stages["stage1"].make_sampler(trainer.data.train.index)
    assert type(picked) is {"balanced": BalancedSampler, "uniform": UniformSampler}[sampler]


def test_stage2_length_window_groups_the_stage2_batches_by_length(data, tmp_path):
    cfg = tiny_config("baseline", tmp_path / "run", data, **{"stage2.steps": 8, "stage2.length_window": 4})
    trainer = Trainer(cfg)
    index = trainer.data.train.index
    sampler = trainer.stages["stage2"].make_sampler(index)
    lengths = index.lengths[np.array(list(sampler)).reshape(2, 4, sampler.global_batch_size)]
    for window in lengths:  # two windows of four steps: batches cut from one length-sorted list
        spans = sorted((batch.min(), batch.max()) for batch in window)
        assert all(shorter[1] <= longer[0] for shorter, longer in zip(spans, spans[1:])), spans


def test_stage1_critic_learns_a_learnable_reward(data, tmp_path):
    # In the tiny data the reward is decided by one completion token ("+" or "*"), so a critic that
    # trains on the right target explains most of the reward variance over the completion tokens.
    overrides = {
        "stage1.steps": 120,
        "run.max_steps": 120,
        "stage1.unfreeze_trunk": True,
        "checkpoint.every": 0,
        "data.eval_batches": 12,
    }
    result = Trainer(tiny_config("verifiable", tmp_path / "run", data, **overrides)).fit()
    assert result["evals"]["stage1_train"] > 0.5


@pytest.mark.parametrize("stop", [2, 5])
def test_interrupted_and_resumed_run_is_bitwise_identical(stop, data, tmp_path):
    full = Trainer(tiny_config("verifiable", tmp_path / "full", data)).fit()
    out = tmp_path / "split"
    first = Trainer(tiny_config("verifiable", out, data, **{"run.max_steps": stop})).fit()
    assert not first["finished"] and first["steps"] == stop
    resumed_trainer = Trainer(tiny_config("verifiable", out, data), resume="latest")
    second = resumed_trainer.fit()
    assert second["finished"]
    combined = losses(first) + losses(second)
    assert combined == losses(full)  # exact float equality, step by step
    assert [h["lr"] for h in first["history"] + second["history"]] == [h["lr"] for h in full["history"]]


def test_nan_step_is_skipped_with_optimizer_untouched(data, tmp_path):
    one = Trainer(tiny_config("baseline", tmp_path / "one", data, **{"run.max_steps": 1}))
    one.fit()
    skipped = Trainer(
        tiny_config(
            "baseline", tmp_path / "two", data, **{"run.max_steps": 2, "numerics.inject_nan_steps": "2"}
        )
    )
    result = skipped.fit()
    assert [h["step_skipped"] for h in result["history"]] == [0.0, 1.0]
    assert result["history"][-1]["skipped_steps"] == 1.0
    a, b = full_state(one), full_state(skipped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # training goes on after an isolated skip
    going_on = Trainer(
        tiny_config("baseline", tmp_path / "three", data, **{"numerics.inject_nan_steps": "2"})
    ).fit()
    assert going_on["finished"] and math.isfinite(going_on["history"][-1]["total_loss"])


def test_consecutive_nan_steps_abort_with_a_diagnostic(data, tmp_path):
    cfg = tiny_config(
        "baseline",
        tmp_path / "run",
        data,
        **{"numerics.inject_nan_steps": "1,2,3", "numerics.max_consecutive_skips": 3},
    )
    with pytest.raises(NonFiniteAbort, match="3 consecutive steps"):
        Trainer(cfg).fit()


def test_debug_check_finite_names_the_non_finite_hidden_states(data, tmp_path):
    def poisoned_trainer(check_finite):
        overrides = {
            "run.max_steps": 1,
            "numerics.check_finite": check_finite,
            "numerics.max_consecutive_skips": 1,
        }
        trainer = Trainer(tiny_config("baseline", tmp_path / str(check_finite), data, **overrides))
        norm = trainer.model.head.norm.weight
        with torch.no_grad():
            (norm.to_local() if hasattr(norm, "to_local") else norm).fill_(float("nan"))
        return trainer

    with pytest.raises(ValueError, match=r"hidden \[.*\] holds \d+ non-finite"):
        poisoned_trainer(True).fit()
    with pytest.raises(NonFiniteAbort):  # without the check the NaN is only seen in the loss
        poisoned_trainer(False).fit()


def test_fused_and_reference_losses_agree(data, tmp_path):
    fused = Trainer(tiny_config("verifiable", tmp_path / "f", data, **{"run.max_steps": 5})).fit()
    ref = Trainer(
        tiny_config(
            "verifiable", tmp_path / "r", data, **{"run.max_steps": 5, "stage2.loss_impl": "reference"}
        )
    ).fit()
    for (_, a), (_, b) in zip(losses(fused), losses(ref)):
        assert a == pytest.approx(b, rel=1e-4)


def test_export_loads_as_meta_checkpoint(data, tmp_path):
    from wmtp_train.model.meta_checkpoint import load_meta_checkpoint

    cfg = tiny_config("baseline", tmp_path / "run", data, **{"run.max_steps": 1, "checkpoint.export": True})
    trainer = Trainer(cfg)
    trainer.fit()
    model, _ = load_meta_checkpoint(tmp_path / "run" / "export")
    trained = full_state(trainer)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # and a run can start from it
    cfg2 = tiny_config(
        "baseline",
        tmp_path / "run2",
        data,
        **{"run.max_steps": 1, "model.checkpoint_dir": str(tmp_path / "run" / "export")},
    )
    started = Trainer(cfg2)
    assert all(torch.equal(v, trained[k]) for k, v in full_state(started).items())


def test_fresh_value_head_of_a_meta_checkpoint_does_not_depend_on_the_rank_seed(data, tmp_path):
    cfg = tiny_config("baseline", tmp_path / "run", data, **{"run.max_steps": 1, "checkpoint.export": True})
    trainer = Trainer(cfg)
    trainer.fit()
    export = tmp_path / "run" / "export"
    (export / "value_head.pth").unlink()  # a Meta release has no critic: the value head starts fresh
    states = []
    for rank_seed in (1, 2):  # what seed_everything(seed + rank) leaves behind on two ranks
        torch.manual_seed(rank_seed)
        states.append(trainer.builder.initial_state(str(export)))
    assert any(k.startswith("value_head.") for k in states[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
