"""The trainer's parts: token-weighting recipes, a stage's step on given batches, the pooled step statistics,
the running explained variance, and models started from Meta checkpoints."""

import dataclasses
import json
import math

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_kernels import IGNORE_INDEX, applied_weight_mask
from wmtp_train.model import PRESETS, build_model, export_meta_checkpoint, load_meta_checkpoint
from wmtp_train.train.metrics import RunningExplainedVariance, StepStats
from wmtp_train.train.trainer import Trainer
from wmtp_train.train.weighting import WEIGHTINGS, TokenWeighting

POOLED = (
    "mtp_loss",
    "total_loss",
    "explained_variance",
    *(f"ce_head{k}" for k in range(1, 5)),
    *(f"weight_{s}" for s in ("mean", "std", "min", "max", "entropy")),
    *(f"td_{s}" for s in ("mean", "std", "min", "max")),
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl")


def full_state(trainer):
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def test_every_recipe_class_is_registered_once():
    assert set(WEIGHTINGS) == {"uniform", "correct_only", "td", "rho1"}
    with pytest.raises(ValueError, match="defined twice"):

        class Again(TokenWeighting):
            name = "td"


def test_correct_only_samples_only_correct_records_and_learns(data, tmp_path):
    trainer = Trainer(tiny_config("correct_only", tmp_path / "run", data, **{"stage2.steps": 6}))
    stage = trainer.stages["stage2"]
    rewards = []
    step = stage.step

    def watched(batches):
        rewards.extend(float(r) for batch in batches for r in batch["rewards"])
        return step(batches)

    stage.step = watched
    result = trainer.fit()
    # The whole budget (6 steps x 2 micro-batches x 2 samples) goes to correct records.
    assert result["finished"] and rewards == [1.0] * 24
    history = result["history"]
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"]
    assert history[0]["weight_std"] == pytest.approx(0.0, abs=1e-6)  # uniform weights


def test_a_stage_step_runs_on_batches_it_is_handed(data, tmp_path):
    trainer = Trainer(tiny_config("verifiable", tmp_path / "run", data))
    stage = trainer.stages["stage2"]
    stage.setup(trainer.data.train.index)
    before = full_state(trainer)
    batches = [trainer.data.batch([0, 1]), trainer.data.batch([2, 3])]
    result = stage.step(batches)
    assert result.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert math.isfinite(result.metrics["total_loss"]) and result.metrics["step_skipped"] == 0.0
    after = full_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def step_rows(result):
    return [h for h in result["history"] if h["stage"] == 2.0]


def test_step_statistics_do_not_depend_on_the_micro_batch_split(data, tmp_path):
    """True extremes and pooled moments: the same 8 samples per step in 2 or in 4 micro-batches log the
    same statistics (up to float summation order)."""
    results = {}
    for micro, accum in ((4, 2), (2, 4)):
        overrides = {"stage2.micro_batch_size": micro, "stage2.grad_accum": accum, "checkpoint.every": 0}
        results[micro] = step_rows(
            Trainer(tiny_config("verifiable", tmp_path / str(micro), data, **overrides)).fit()
        )
    for coarse, fine in zip(results[4], results[2], strict=True):
        for key in POOLED:
            assert fine[key] == pytest.approx(coarse[key], rel=1e-4, abs=1e-6), (coarse["step"], key)


def test_step_statistics_are_the_extremes_and_pooled_moments_of_the_micro_batches(data, tmp_path):
    trainer = Trainer(tiny_config("verifiable", tmp_path / "run", data, **{"run.max_steps": 4}))
    seen = []
    trainer.model.head.register_forward_hook(
        lambda module, args, out: seen.append((args[1], args[2], out.stats))
    )
    stage2 = step_rows(trainer.fit())[0]
    per_micro_batch = [(labels, mask, stats) for labels, mask, stats in seen if stats is not None][:2]
    assert len(per_micro_batch) == 2
    maxima = [stats["weight_max"] for _, _, stats in per_micro_batch]
    assert maxima[0] != maxima[1]  # so that a mean of the extremes would differ from the extreme
    assert stage2["weight_max"] == max(maxima)
    assert stage2["td_min"] == min(stats["td_min"] for _, _, stats in per_micro_batch)
    counts = [
        int(applied_weight_mask(labels, mask, IGNORE_INDEX).sum()) for labels, mask, _ in per_micro_batch
    ]
    mean = sum(n * s["weight_mean"] for n, (_, _, s) in zip(counts, per_micro_batch)) / sum(counts)
    assert stage2["weight_mean"] == pytest.approx(mean, rel=1e-6)


def test_pooled_entropy_and_std_equal_those_of_the_concatenated_weights():
    from wmtp_kernels import compute_weight_stats

    weights = [torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3.0]), torch.tensor([0.1, 4.0, 1.0, 1.0])]
    stats = StepStats()
    for w in weights:
        counts = torch.tensor([float(len(w))] * 4, dtype=torch.float64)
        ce = {f"ce_head{k}": 1.0 for k in range(1, 5)}
        stats.add_loss_stats({**ce, **compute_weight_stats(w)}, counts)
    pooled = stats.reduce(torch.device("cpu")).loss_stats
    expected = compute_weight_stats(torch.cat(weights))
    for key, value in expected.items():
        assert pooled[key] == pytest.approx(value, rel=1e-9), key


def test_running_explained_variance_survives_steps_without_reward_variance():
    from wmtp_train.eval.metrics import ev_moments

    running = RunningExplainedVariance(decay=0.5)
    values = torch.tensor([[0.9, 0.8], [0.1, 0.3]])
    mixed = ev_moments(values, torch.tensor([1.0, 0.0]), torch.ones(2, 2))
    constant = ev_moments(values, torch.tensor([1.0, 1.0]), torch.ones(2, 2))
    assert math.isnan(running.update(constant))  # no reward variance seen yet
    first = running.update(mixed)
    assert math.isfinite(first)
    assert math.isfinite(running.update(constant)) and running.update(constant) != first


def test_progress_line_shows_the_running_explained_variance(data, tmp_path, capsys):
    # One sample per stage-1 step: no step has reward variance of its own.
    overrides = {"stage1.micro_batch_size": 1, "stage1.steps": 6, "run.max_steps": 6, "run.log_every": 1}
    result = Trainer(tiny_config("verifiable", tmp_path / "run", data, **overrides)).fit()
    assert all(math.isnan(h["explained_variance"]) for h in result["history"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[stage1] ")]
    assert len(lines) == 6 and "ev nan" not in lines[-1] and " ev " in lines[-1]
    assert math.isfinite(result["history"][-1]["explained_variance_ema"])


def meta_checkpoint(tmp_path, variant):
    args = PRESETS["micro"]
    if variant == "linear_value_head":
        args = dataclasses.replace(args, value_head="linear", value_output="identity")
    source = build_model(args)
    directory = export_meta_checkpoint(source, tmp_path / "meta")
    if variant == "vocab_size_minus_one":  # Llama 2's params.json: the vocabulary is the embedding's
        params = json.loads((directory / "params.json").read_text())
        (directory / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    return source, directory


@pytest.mark.parametrize("variant", ["vocab_size_minus_one", "linear_value_head"])
def test_trainer_builds_a_meta_checkpoint_as_the_loader_reads_it(variant, data, tmp_path):
    source, directory = meta_checkpoint(tmp_path, variant)
    overrides = {"run.max_steps": 1, "model.checkpoint_dir": str(directory)}
    trainer = Trainer(tiny_config("baseline", tmp_path / "run", data, **overrides))
    assert trainer.builder.args == load_meta_checkpoint(directory)[1]
    started = full_state(trainer)
    assert all(torch.equal(started[k], v) for k, v in source.state_dict().items())
    assert trainer.fit()["steps"] == 1
