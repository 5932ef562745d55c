import json

import pytest
import torch
from decoding_models import single_thread, tiny_decoder
from test_evaluate import write_records

from wmtp_train.config_files import load_recipe
from wmtp_train.eval import compare
from wmtp_train.eval.critic import CriticOptions, critic_report
from wmtp_train.eval.loading import load_for_evaluation
from wmtp_train.model.meta_checkpoint import export_meta_checkpoint
from wmtp_train.train.tracking import default_tracking_uri


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with single_thread():
        yield


def fake_run(root, name: str, recipe: str, seed: int, losses: list[float]):
    """A run directory as the trainer leaves it: export/, mlflow.db + mlflow_run_id."""
    from mlflow.tracking import MlflowClient

    run_dir = root / name
    model = tiny_decoder(seed=seed)
    torch.nn.init.normal_(model.value_head.proj.weight, std=1.0)
    export_meta_checkpoint(model, run_dir / "export")
    client = MlflowClient(tracking_uri=default_tracking_uri(run_dir))
    run_id = client.create_run(client.create_experiment("wmtp")).info.run_id
    client.log_param(run_id, "recipe", recipe)
    for step, loss in enumerate(losses, start=1):
        client.log_metric(run_id, "mtp_loss", loss, step=step)
        client.log_metric(run_id, "explained_variance", 0.1 * step, step=step)
    client.set_terminated(run_id)
    (run_dir / "mlflow_run_id").write_text(run_id)
    return run_dir


def test_compare_writes_table_and_png(tmp_path):
    runs = [
        fake_run(tmp_path, "base", "baseline", 0, [3.0, 2.5, 2.2]),
        fake_run(tmp_path, "td", "verifiable", 1, [3.1, 2.4, 2.0, 1.9]),
    ]
    write_records(tmp_path / "heldout.jsonl", n=6)
    out = tmp_path / "report" / "report.md"
    code = compare.main(
        [*map(str, runs), "--out", str(out), "--limit", "2", "--max-new-tokens", "8",
         "--critic-data", str(tmp_path / "heldout.jsonl"), "--workers", "2"]
    )  # fmt: skip
    assert code == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows[1:]}
    assert set(table) == {"base", "td"}
    assert table["base"][header.index("recipe")] == "baseline"
    assert table["td"][header.index("steps")] == "4"
    assert table["td"][header.index("final MTP loss")] == "1.900"
    assert "final CE head 1" not in header  # never logged by these runs
    for run in runs:
        evaluation = json.loads(
            (tmp_path / "report" / "report_eval" / run.name / "humaneval_metrics.json").read_text()
        )
        critic = json.loads(
            (tmp_path / "report" / "report_eval" / run.name / "critic_metrics.json").read_text()
        )
        row = table[run.name]
        assert row[header.index("pass@1 all")] == f"{evaluation['pass@1']:.3f}"
        assert row[header.index("critic AUC (V last)")] == f"{critic['auc_last_value']:.3f}"
        assert (
            row[header.index("tokens / forward (MTP self-spec.)")]
            == f"{evaluation['tokens_per_forward']:.3f}"
        )
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](report.png)" in text


def test_curves_from_mlflow_and_from_jsonl(tmp_path):
    run = fake_run(tmp_path, "r", "rho1_weighted", 2, [1.0, 0.5])
    recipe, curves = compare.read_training_curves(run, ["mtp_loss", "ce_head1"])
    assert recipe == "rho1_weighted"
    assert curves == {"mtp_loss": [(1, 1.0), (2, 0.5)]}
    # Without an MLflow id the trainer's metrics.jsonl is read.
    plain = tmp_path / "plain"
    plain.mkdir()
    lines = [{"params": {"recipe": "baseline"}}, {"step": 1, "mtp_loss": 2.0}, {"step": 2, "mtp_loss": None}]
    (plain / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert compare.read_training_curves(plain, ["mtp_loss"]) == ("baseline", {"mtp_loss": [(1, 2.0)]})
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        compare.read_training_curves(tmp_path / "missing", ["mtp_loss"])


def test_markdown_table_marks_missing_values():
    runs = [
        compare.RunSummary("a", "baseline", 3, {"mtp_loss": 1.25}, {}, {"pass@1": 0.5}),
        compare.RunSummary("b", "verifiable", 5, {}, {}, {"pass@1": float("nan")}),
    ]
    lines = compare.markdown_table(runs).splitlines()
    assert lines[0] == "| run | recipe | steps | final MTP loss | pass@1 all |"
    assert lines[2] == "| a | baseline | 3 | 1.250 | 0.500 |"
    assert lines[3] == "| b | verifiable | 5 | – | – |"


def test_critic_columns_use_each_runs_own_td_options_and_max_len(tmp_path):
    run = fake_run(tmp_path, "td", "verifiable", 1, [3.0, 2.0])
    config = load_recipe("verifiable", ["data.max_len=24"])  # terminal = "last_transition"
    (run / "config.toml").write_text(config.to_toml())
    data = tmp_path / "heldout.jsonl"
    write_records(data, n=6)
    out = tmp_path / "report" / "report.md"
    assert compare.main([str(run), "--out", str(out), "--no-humaneval", "--critic-data", str(data)]) == 0
    reported = json.loads((out.parent / "report_eval" / "td" / "critic_metrics.json").read_text())
    model, tokenizer, _ = load_for_evaluation(run)
    own = critic_report(model, tokenizer, data, CriticOptions(config.td, max_len=24), tmp_path / "own")
    default = critic_report(model, tokenizer, data, CriticOptions(), tmp_path / "default")
    assert reported == pytest.approx(own, nan_ok=True)  # NaN: no mutated token in these records
    assert own["mean_weight_correct"] != default["mean_weight_correct"]
