"""pass@k on the synthetic tasks: ``evaluate --suite synthetic`` and :mod:`wmtp_train.eval.synthetic`."""

import json

import pytest
from decoding_models import single_thread, tiny_decoder

from wmtp_train.data.__main__ import main as data_main
from wmtp_train.data.synthetic import HELDOUT_SPLITS
from wmtp_train.data.synthetic_build import load_split_problems
from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.eval import evaluate, humaneval, synthetic
from wmtp_train.eval.metrics import pass_at_k
from wmtp_train.inference.generation import Generation
from wmtp_train.model.meta_checkpoint import export_meta_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert data_main(["build-synthetic", "--out", str(out), "--problems", "24", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    export_meta_checkpoint(tiny_decoder(seed=2), run / "export")
    return run


def test_pass_at_k_per_split_follows_the_sandbox(monkeypatch, built, tmp_path):
    """Canonical solutions on one split, a wrong body and a canonical one on the other: pass@k per split."""

    def fake_generate(model, tokenizer, problems, options):
        gens = [
            [
                Generation([], p["canonical_solution"], "eos"),
                Generation(
                    [],
                    "    return None\n" if p["split"] == HELDOUT_SPLITS[1] else p["canonical_solution"],
                    "eos",
                ),
            ]
            for p in problems
        ]
        return gens, [False] * len(problems), humaneval.DecodeStats()

    monkeypatch.setattr(humaneval, "generate_completions", fake_generate)
    options = humaneval.HumanEvalOptions(samples=2, temperature=1.0, k=(1, 2), programs_per_sandbox=16)
    metrics = synthetic.evaluate_synthetic(tiny_decoder(), ByteTokenizer(), options, tmp_path, built)
    first, second = HELDOUT_SPLITS
    assert metrics[f"pass@1/{first}"] == metrics[f"pass@2/{first}"] == 1.0
    assert metrics[f"pass@1/{second}"] == pytest.approx(pass_at_k(2, 1, 1))
    assert metrics[f"pass@2/{second}"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "synthetic_records.jsonl").read_text().splitlines()]
    expected = [p for split in HELDOUT_SPLITS for p in load_split_problems(built, split)]
    assert [r["task_id"] for r in records] == [p["task_id"] for p in expected]
    assert metrics[f"n_problems/{first}"] == len(load_split_problems(built, first))
    for record, problem in zip(records, expected):
        assert record["split"] == problem["split"]
        assert {k: record[k] for k in synthetic.PROVENANCE} == {k: problem[k] for k in synthetic.PROVENANCE}
        assert [s["passed"] for s in record["samples"]] == [True, record["split"] == first]


def test_batched_scoring_agrees_with_one_process_per_program(built):
    problems = load_split_problems(built, "train")[:4]
    completions = [
        [p["canonical_solution"], "    return None\n", "    while True:\n        pass\n"] for p in problems
    ]
    alone = humaneval.score_completions(
        problems, completions, humaneval.HumanEvalOptions(timeout_s=1.0, workers=2)
    )
    batched = humaneval.score_completions(
        problems, completions, humaneval.HumanEvalOptions(timeout_s=1.0, workers=2, programs_per_sandbox=8)
    )
    verdicts = [[(r.passed, r.timed_out) for r in runs] for runs in alone]
    assert verdicts == [[(r.passed, r.timed_out) for r in runs] for runs in batched]
    assert verdicts == [[(True, False), (False, False), (False, True)]] * len(problems)
    assert all(r.returncode is None and r.stderr_tail == "" for runs in batched for r in runs)


def test_cli_end_to_end_with_a_tiny_model(built, run_dir, tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--checkpoint", str(run_dir), "--suite", "synthetic", "--data", str(built),
         "--split", "train,heldout_problems", "--limit", "2", "--max-new-tokens", "8", "--samples", "2",
         "--temperature", "0.8", "--k", "1,2", "--out", str(out), "--no-mlflow"]
    )  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "synthetic_records.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "heldout_problems", "heldout_problems"]
    assert all(r["n"] == 2 and 0 < s["n_tokens"] <= 8 for r in records for s in r["samples"])
    metrics = json.loads((out / "synthetic_metrics.json").read_text())
    assert metrics["n_problems/train"] == metrics["n_problems/heldout_problems"] == 2
    assert set(metrics) >= {"pass@1/train", "pass@2/heldout_problems", "pass@2"}


def test_bad_arguments(built, run_dir, tmp_path):
    with pytest.raises(ValueError, match="--data"):
        evaluate.main(["--checkpoint", str(run_dir), "--suite", "synthetic", "--no-mlflow"])
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.synthetic_problems(built, ["validation"])
    with pytest.raises(ValueError, match="splits is empty"):
        synthetic.synthetic_problems(built, [])
    options = humaneval.HumanEvalOptions(split="heldout")
    with pytest.raises(ValueError, match="splits="):
        synthetic.evaluate_synthetic(tiny_decoder(), ByteTokenizer(), options, tmp_path, built)
    with pytest.raises(ValueError, match="programs_per_sandbox"):
        humaneval.HumanEvalOptions(programs_per_sandbox=0)
