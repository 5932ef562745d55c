"""Atomic, verified checkpoints: layout, pruning, refusal of broken checkpoints, fallback on resume."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    ModelOptimizerState,
    RNGState,
    load_checkpoint,
    verify_checkpoint,
)
from wmtp_train.train.parallelize import init_distributed
from wmtp_train.train.trainer import Trainer


@pytest.fixture(autouse=True, scope="module")
def _group():
    init_distributed("cpu")


def make_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def state_of(model, opt, extra):
    return {"app": ModelOptimizerState(model, opt), "extra": extra, "rng.rank0": RNGState()}


def test_save_layout_pruning_and_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep=2)
    model, opt = make_state()
    for step in (1, 2, 3):
        mgr.save(step, state_of(model, opt, {"step": step}), {"stage": "stage2"})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000002", "step_00000003"]  # keep=2, no .tmp left
    manifest = verify_checkpoint(tmp_path / "ckpt" / "step_00000003")
    assert manifest["step"] == 3 and manifest["stage"] == "stage2" and ".metadata" in manifest["files"]

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    mgr.save(4, state_of(model, opt, {"step": 4}), {"stage": "stage2"})
    expected = (torch.rand(3), np.random.rand(2), random.random())  # draws right after the save
    other, other_opt = make_state(seed=5)  # moves every generator on
    state = state_of(other, other_opt, {"step": -1})
    load_checkpoint(mgr.latest().path, state)
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["extra"]["step"] == 4
    assert torch.equal(torch.rand(3), expected[0])
    assert np.random.rand(2).tolist() == expected[1].tolist()
    assert random.random() == expected[2]


def _checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep=3)
    model, opt = make_state()
    for step in (1, 2):
        mgr.save(step, state_of(model, opt, {}), {"stage": "stage2"})
    return mgr, tmp_path / "ckpt" / "step_00000002"


def _data_file(directory):
    return next(p for p in directory.iterdir() if p.suffix == ".distcp")


def test_truncated_checkpoint_is_refused_and_resume_falls_back(tmp_path, caplog):
    mgr, latest = _checkpoints(tmp_path)
    data = _data_file(latest)
    data.write_bytes(data.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(latest)
    with caplog.at_level("WARNING"):
        found = mgr.latest()
    assert found.step == 1
    assert "refusing checkpoint" in caplog.text and "truncated" in caplog.text


def test_corrupted_checkpoint_is_refused(tmp_path):
    mgr, latest = _checkpoints(tmp_path)
    data = _data_file(latest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC32"):
        verify_checkpoint(latest)
    assert mgr.latest().step == 1


def test_incomplete_and_in_progress_saves_are_ignored(tmp_path):
    mgr, latest = _checkpoints(tmp_path)
    (latest / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(latest)
    (tmp_path / "ckpt" / "step_00000009.tmp").mkdir()  # a save killed midway
    assert mgr.latest().step == 1
    bad = latest / MANIFEST
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        verify_checkpoint(latest)
    model, opt = make_state()
    mgr.save(3, state_of(model, opt, {}), {"stage": "stage2"})
    assert not (tmp_path / "ckpt" / "step_00000009.tmp").exists()
    assert mgr.latest().step == 3
    assert json.loads((tmp_path / "ckpt" / "step_00000003" / MANIFEST).read_text())["step"] == 3


def test_resaving_a_step_keeps_a_complete_copy_when_killed(tmp_path, monkeypatch):
    """A kill after the old copy of a step is set aside but before the new one is in place."""
    mgr, latest = _checkpoints(tmp_path)
    replace = os.replace

    def killed_before_the_new_copy_lands(src, dst):
        if Path(src).is_dir() and Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt("killed")
        return replace(src, dst)

    model, opt = make_state(seed=3)
    monkeypatch.setattr(os, "replace", killed_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, state_of(model, opt, {}), {"stage": "stage2"})
    monkeypatch.undo()
    found = mgr.latest()
    assert found.step == 2  # the old copy of step 2, still complete
    verify_checkpoint(found.path)
    mgr.save(3, state_of(model, opt, {}), {"stage": "stage2"})  # the next save tidies up
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step_00000001",
        "step_00000002",
        "step_00000003",
    ]
    mgr.save(2, state_of(model, opt, {"replaced": 1}), {"stage": "stage2"})  # an uninterrupted re-save
    assert not list((tmp_path / "ckpt").glob("step_*.old")) and verify_checkpoint(latest)["step"] == 2


def test_trainer_resume_skips_a_corrupted_latest_checkpoint(tmp_path):
    data = write_tiny_jsonl(tmp_path / "tiny.jsonl")
    full = Trainer(tiny_config("baseline", tmp_path / "full", data, **{"stage2.steps": 6})).fit()
    out = tmp_path / "split"
    Trainer(tiny_config("baseline", out, data, **{"stage2.steps": 6, "run.max_steps": 4})).fit()
    latest = out / "checkpoints" / "step_00000004"
    data_file = _data_file(latest)
    data_file.write_bytes(data_file.read_bytes()[:100])
    resumed = Trainer(tiny_config("baseline", out, data, **{"stage2.steps": 6}), resume="latest")
    assert resumed.resume_from.step == 2
    result = resumed.fit()
    assert [h["total_loss"] for h in result["history"]] == [h["total_loss"] for h in full["history"][2:]]
