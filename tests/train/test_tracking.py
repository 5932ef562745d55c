"""MLflow on rank 0 (embedded sqlite store), the local JSONL, and an unreachable tracking server."""

import json
import warnings

import pytest
from trainer_utils import tiny_config, write_tiny_jsonl

from wmtp_train.train.tracking import METRICS_FILE, Tracker, default_tracking_uri
from wmtp_train.train.trainer import Trainer


def test_default_uri_is_sqlite_under_out(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert default_tracking_uri(tmp_path) == "http://example:5000"
    assert default_tracking_uri(tmp_path, "sqlite:///x.db") == "sqlite:///x.db"


def test_training_run_logs_params_metrics_and_artifact(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_tiny_jsonl(tmp_path / "tiny.jsonl")
    out = tmp_path / "run"
    cfg = tiny_config(
        "verifiable", out, data, **{"tracking.enabled": True, "checkpoint.export": True, "stage2.steps": 2}
    )
    trainer = Trainer(cfg)
    trainer.fit()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    run = client.get_run(trainer.tracker.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["recipe"] == "verifiable"
    assert params["stage2.value_coef"] == "0.5" and params["td.terminal"] == "last_transition"
    assert params["data.path"] == str(data)
    metrics = run.data.metrics
    for key in (
        "total_loss",
        "mtp_loss",
        "value_loss",
        "explained_variance",
        "ce_head1",
        "ce_head4",
        "td_mean",
        "td_std",
        "weight_mean",
        "weight_entropy",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "peak_memory_mb",
        "eval/stage1_train_explained_variance",
    ):
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "lr")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/consolidated.pth" in artifacts and "export/params.json" in artifacts
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert lines[0]["params"]["recipe"] == "verifiable"
    assert [line["step"] for line in lines if "lr" in line] == [1, 2, 3, 4, 5]


def test_unreachable_server_warns_once_and_keeps_local_metrics(tmp_path):
    with pytest.warns(RuntimeWarning, match="MLflow unavailable") as record:
        tracker = Tracker(tmp_path, active=True, tracking_uri="http://127.0.0.1:9", experiment="x")
        tracker.log_params({"a": 1})
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step, "bad": float("nan")}, step)
        tracker.close()
    assert len([w for w in record if "MLflow unavailable" in str(w.message)]) == 1
    assert not tracker.mlflow_ok
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines[0] == {"params": {"a": "1"}}
    assert [line["loss"] for line in lines[1:]] == [1.0, 0.5, 1.0 / 3]
    assert lines[1]["bad"] is None


def test_training_continues_when_the_server_is_down(tmp_path):
    data = write_tiny_jsonl(tmp_path / "tiny.jsonl")
    cfg = tiny_config(
        "baseline",
        tmp_path / "run",
        data,
        **{"tracking.enabled": True, "tracking.tracking_uri": "http://127.0.0.1:9"},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(cfg).fit()
    assert result["finished"]
    assert sum("MLflow unavailable" in str(w.message) for w in caught) == 1
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert len([line for line in lines if '"step"' in line]) == 4


def test_inactive_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "r1", active=False)
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "r1").exists()
