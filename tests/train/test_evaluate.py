import json
import math

import numpy as np
import pytest
import torch
from decoding_models import single_thread, tiny_decoder

from wmtp_kernels.reference import build_weights, compute_td_errors, explained_variance
from wmtp_train.config_files import load_recipe
from wmtp_train.data import dataset
from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.eval import critic, evaluate, humaneval, loading
from wmtp_train.eval.metrics import (
    mean_pass_at_k,
    mutation_positions,
    pass_at_k,
    prefix_oracle_explained_variance,
    roc_auc,
)
from wmtp_train.inference.generation import Generation
from wmtp_train.model.meta_checkpoint import export_meta_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def critic_model():
    model = tiny_decoder(seed=5)
    torch.nn.init.normal_(model.value_head.proj.weight, std=2.0)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, critic_model):
    run = tmp_path_factory.mktemp("run")
    export_meta_checkpoint(critic_model, run / "export")
    return run


# --------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 10) == 1.0
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(20, 0, 10) == 0.0
    assert pass_at_k(20, 5, 10) == pytest.approx(1 - math.comb(15, 10) / math.comb(20, 10), rel=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_matches_binomials_everywhere():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # Large n where the binomials overflow floats: still finite and in [0, 1].
    assert 0 < pass_at_k(2000, 3, 100) < 1


def test_mean_pass_at_k_and_errors():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert math.isnan(mean_pass_at_k([], 1))
    for n, c, k in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


# ------------------------------------------------------------------------------------------------ AUC


def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_cases():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts one half
    assert roc_auc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)  # (1 + 0.5 + 1 + 1) / 4
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)
        labels = rng.random(30) < 0.4
        if labels.all() or not labels.any():
            continue
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        roc_auc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0.1, float("nan")], [1, 0])


# -------------------------------------------------------------------------------------------- sandbox


def test_sandbox_scores_canonical_passed_and_broken_failed():
    problem = humaneval.humaneval_problems(limit=1)[0]
    options = humaneval.HumanEvalOptions(timeout_s=20.0, workers=2)
    completions = [[problem["canonical_solution"], "    return None\n"]]
    [[good, bad]] = humaneval.score_completions([problem], completions, options)
    assert good.passed, good.stderr_tail
    assert not bad.passed and not bad.timed_out
    assert "AssertionError" in bad.stderr_tail


def test_pipeline_aggregates_sandbox_results(monkeypatch, tmp_path, critic_model):
    """With generation replaced by known completions, pass@k follows the sandbox's verdicts."""
    problems = humaneval.humaneval_problems(limit=2)
    texts = {
        problems[0]["task_id"]: [problems[0]["canonical_solution"], "    return None\n"],
        problems[1]["task_id"]: ["    raise ValueError\n", "    return None\n"],
    }

    def fake_generate(model, tokenizer, problems, options):
        gens = [[Generation([], t, "stop") for t in texts[p["task_id"]]] for p in problems]
        return gens, [False] * len(problems), humaneval.DecodeStats()

    monkeypatch.setattr(humaneval, "generate_completions", fake_generate)
    options = humaneval.HumanEvalOptions(samples=2, temperature=1.0, k=(1, 2, 10), timeout_s=20.0)
    metrics = humaneval.evaluate_humaneval(critic_model, ByteTokenizer(), options, tmp_path, problems)
    assert metrics["pass@1"] == pytest.approx((pass_at_k(2, 1, 1) + 0) / 2)
    assert metrics["pass@2"] == pytest.approx(0.5)
    assert "pass@10" not in metrics  # needs 10 samples
    records = [json.loads(line) for line in (tmp_path / "humaneval_records.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in records] == [1, 0]
    assert [s["passed"] for s in records[0]["samples"]] == [True, False]
    splits = humaneval.problem_splits()
    assert [r["split"] for r in records] == [splits[p["task_id"]] for p in problems]
    for split in ("train", "heldout"):
        mine = [pass_at_k(2, r["passed"], 2) for r in records if r["split"] == split]
        assert metrics.get(f"pass@2/{split}") == (pytest.approx(np.mean(mine)) if mine else None)


def test_problem_split_selection():
    splits = humaneval.problem_splits()
    heldout = humaneval.humaneval_problems(split="heldout")
    train = humaneval.humaneval_problems(split="train")
    assert {p["task_id"] for p in heldout} == {t for t, s in splits.items() if s == "heldout"}
    assert len(heldout) + len(train) == len(humaneval.humaneval_problems()) == len(splits)
    assert 0 < len(heldout) < len(train)
    with pytest.raises(ValueError, match="split"):
        humaneval.HumanEvalOptions(split="test")


# ---------------------------------------------------------------------------------------- end to end


def test_resolve_checkpoint(run_dir, tmp_path):
    assert loading.resolve_checkpoint(run_dir) == run_dir / "export"
    assert loading.resolve_checkpoint(run_dir / "export") == run_dir / "export"
    with pytest.raises(FileNotFoundError, match="params.json"):
        loading.resolve_checkpoint(tmp_path)


def test_encode_prompt_keeps_bos_and_tail():
    tokenizer = ByteTokenizer()
    ids, cut = dataset.encode_prompt(tokenizer, "abcdef", room=4)
    assert cut and ids == [tokenizer.bos_id, *b"def"]
    ids, cut = dataset.encode_prompt(tokenizer, "ab", room=4)
    assert not cut and ids == [tokenizer.bos_id, *b"ab"]


def test_humaneval_end_to_end_tiny_model(run_dir, tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main(
        ["--checkpoint", str(run_dir), "--suite", "humaneval", "--limit", "2", "--max-new-tokens", "12",
         "--samples", "2", "--temperature", "0.8", "--k", "1,2", "--out", str(out), "--workers", "2"]
    )  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "humaneval_records.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["n"] == 2 and len(r["samples"]) == 2 for r in records)
    assert all(0 < s["n_tokens"] <= 12 for r in records for s in r["samples"])
    metrics = json.loads((out / "humaneval_metrics.json").read_text())
    expected = np.mean([pass_at_k(r["n"], r["passed"], 1) for r in records])
    assert metrics["pass@1"] == pytest.approx(expected)
    assert metrics["n_samples"] == 4
    # Logged to the embedded MLflow store under the out dir.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(evaluate.EVAL_EXPERIMENT).experiment_id])
    assert run.data.metrics["humaneval/pass_at_1"] == pytest.approx(expected)
    assert run.data.params["samples"] == "2"


def test_humaneval_greedy_speculative_matches_plain(run_dir, tmp_path):
    model, tokenizer, _ = loading.load_for_evaluation(run_dir)
    problems = humaneval.humaneval_problems(limit=2)
    plain_opts = humaneval.HumanEvalOptions(max_new_tokens=10, batch_size=2)
    fast_opts = humaneval.HumanEvalOptions(max_new_tokens=10, batch_size=2, speculative=True)
    plain, _, _ = humaneval.generate_completions(model, tokenizer, problems, plain_opts)
    fast, _, stats = humaneval.generate_completions(model, tokenizer, problems, fast_opts)
    assert [[g.tokens for g in gens] for gens in fast] == [[g.tokens for g in gens] for gens in plain]
    assert stats.forwards > 0


def test_options_validation():
    with pytest.raises(ValueError, match="temperature"):
        humaneval.HumanEvalOptions(samples=4, temperature=0.0)
    with pytest.raises(ValueError, match="greedy"):
        humaneval.HumanEvalOptions(speculative=True, temperature=0.5)
    with pytest.raises(ValueError, match="k must"):
        humaneval.HumanEvalOptions(k=(0,))


# --------------------------------------------------------------------------------------------- critic


def write_records(path, n=10):
    records = [
        {
            "task_id": f"T/{i}",
            "prompt": f"def f{i}(x):\n" + "    # pad\n" * (i % 3),
            "completion": "    return x" + " + 1" * (i % 4) + "\n",
            "is_correct": i % 3 != 1,
            "difficulty": 1 + i % 11,
            **({"variant": "canonical" if i % 3 != 1 else f"mutant:{'ab'[i % 2]}"} if i != 7 else {}),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_critic_report_matches_per_record_computation(tmp_path, critic_model):
    records = write_records(tmp_path / "heldout.jsonl")
    tokenizer = ByteTokenizer()
    options = critic.CriticOptions(batch_size=4)
    metrics = critic.critic_report(
        critic_model, tokenizer, tmp_path / "heldout.jsonl", options, tmp_path / "out"
    )
    # Reference: one unpadded record at a time.
    last_values, labels, token_v, token_r, oracle_records = [], [], [], [], []
    weight_by_label = {True: [], False: []}
    with torch.no_grad():
        for r in records:
            prompt = [tokenizer.bos_id, *tokenizer.encode(r["prompt"])]
            ids = prompt + tokenizer.encode(r["completion"]) + [tokenizer.eos_id]
            v = critic_model.trunk_forward(torch.tensor([ids])).values[0, :, 0]
            reward = torch.tensor([1.0 if r["is_correct"] else 0.0])
            w = build_weights(compute_td_errors(v[None], reward))[0]
            last_values.append(float(v[-1]))
            labels.append(r["is_correct"])
            weight_by_label[r["is_correct"]].extend(w[len(prompt) - 1 : -1].tolist())
            token_v.append(v[len(prompt) :])
            token_r.append(reward.expand(len(ids) - len(prompt)))
            oracle_records.append((ids, len(prompt), float(reward)))
    assert metrics["n_records"] == len(records)
    assert metrics["auc_last_value"] == pytest.approx(roc_auc(last_values, labels))
    assert metrics["explained_variance"] == pytest.approx(
        explained_variance(torch.cat(token_v)[:, None], torch.cat(token_r)), abs=1e-5
    )
    assert metrics["explained_variance_ceiling"] == pytest.approx(
        prefix_oracle_explained_variance(oracle_records)
    )
    assert metrics["mean_weight_correct"] == pytest.approx(np.mean(weight_by_label[True]), abs=1e-5)
    assert metrics["mean_weight_incorrect"] == pytest.approx(np.mean(weight_by_label[False]), abs=1e-5)
    lines = (tmp_path / "out" / "critic_records.jsonl").read_text().splitlines()
    assert [json.loads(line)["value_last"] for line in lines] == pytest.approx(last_values, abs=1e-5)
    assert [json.loads(line)["variant"] for line in lines] == [r.get("variant") for r in records]
    # Per mutation kind: that kind's incorrect records against every correct one; record 7, incorrect
    # without a variant, is in no kind.
    correct = [v for v, y in zip(last_values, labels) if y]
    for kind in ("a", "b"):
        wrong = [v for v, r in zip(last_values, records) if r.get("variant") == f"mutant:{kind}"]
        assert metrics[f"auc_vs_correct/mutant:{kind}"] == pytest.approx(
            roc_auc(correct + wrong, [True] * len(correct) + [False] * len(wrong))
        )
    assert sorted(k for k in metrics if k.startswith("auc_vs_correct/")) == [
        "auc_vs_correct/mutant:a",
        "auc_vs_correct/mutant:b",
    ]


def test_critic_cli(run_dir, tmp_path):
    write_records(tmp_path / "heldout.jsonl", n=6)
    out = tmp_path / "critic"
    data = str(tmp_path / "heldout.jsonl")
    evaluate.main(
        ["--checkpoint", str(run_dir / "export"), "--suite", "critic", "--data", data, "--out", str(out),
         "--no-mlflow"]
    )  # fmt: skip
    metrics = json.loads((out / "critic_metrics.json").read_text())
    assert metrics["n_records"] == 6 and 0 <= metrics["auc_last_value"] <= 1
    assert (out / "metrics.jsonl").is_file()


def test_critic_cli_uses_the_runs_own_td_options_unless_flags_override_them(tmp_path, critic_model):
    run = tmp_path / "run"
    export_meta_checkpoint(critic_model, run / "export")
    config = load_recipe("verifiable", ["data.max_len=24"])  # terminal = "last_transition"
    (run / "config.toml").write_text(config.to_toml())
    data = tmp_path / "heldout.jsonl"
    write_records(data, n=6)
    tokenizer = ByteTokenizer()

    def cli(out, *flags):
        evaluate.main(["--checkpoint", str(run), "--suite", "critic", "--data", str(data), "--out", str(out),
                       "--no-mlflow", *flags])  # fmt: skip
        return json.loads((out / "critic_metrics.json").read_text())

    def direct(out, options):
        return critic.critic_report(critic_model, tokenizer, data, options, out)

    def same(a, b):  # equal, NaN included (no record here has a mutated token)
        return a.keys() == b.keys() and all(
            a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
        )

    own = critic.CriticOptions(config.td, max_len=24)
    assert same(cli(tmp_path / "cli"), direct(tmp_path / "own", own))
    assert critic.critic_options(run / "export") == own
    flagged = cli(tmp_path / "flagged", "--terminal", "last_state", "--max-len", "512")
    assert same(flagged, direct(tmp_path / "default", critic.CriticOptions()))
    assert flagged["mean_weight_correct"] != direct(tmp_path / "own2", own)["mean_weight_correct"]


def test_prefix_oracle_explained_variance_hand_computed():
    # Shared completion prefix [2] then 3 vs 4: the shared position is 0.5 for both, the last is exact.
    # Residuals 0.5, 0, -0.5, 0 (variance 0.125) against rewards 1, 1, 0, 0 (variance 0.25): 0.5.
    shared = [([1, 2, 3], 1, 1.0), ([1, 2, 4], 1, 0.0)]
    assert prefix_oracle_explained_variance(shared) == pytest.approx(0.5)
    distinct = [([1, 5, 3], 1, 1.0), ([1, 2, 4], 1, 0.0)]
    assert prefix_oracle_explained_variance(distinct) == pytest.approx(1.0)
    identical = [([1, 2, 3], 1, 1.0), ([1, 2, 3], 1, 0.0)]
    assert prefix_oracle_explained_variance(identical) == pytest.approx(0.0)
    # The prompt (positions < n_context) does not count: with n_context 2 only the last token counts.
    assert prefix_oracle_explained_variance([(ids, 2, r) for ids, _, r in shared]) == pytest.approx(1.0)
    assert math.isnan(prefix_oracle_explained_variance([([1, 2], 1, 1.0), ([1, 3], 1, 1.0)]))
    assert math.isnan(prefix_oracle_explained_variance([]))


def test_mutation_positions_are_where_an_incorrect_record_leaves_every_correct_one():
    records = [
        ("A", [1, 2, 3, 4], True),  # canonical
        ("A", [1, 2, 9, 4], False),  # mutated at 2
        ("A", [1, 2, 3], False),  # last statement deleted: leaves at its end... a prefix of the canonical
        ("A", [1, 5, 3, 4], True),  # a mutant the tests do not catch
        ("A", [1, 5, 3, 7], False),  # shares 3 tokens with the surviving mutant, 1 with the canonical
        ("B", [1, 2], False),  # no correct record of B
    ]
    assert mutation_positions(records) == [None, 2, None, None, 3, None]


def test_critic_report_weighs_the_mutated_token(tmp_path, critic_model):
    prompt = "def f(x):\n"
    records = [
        {"task_id": "T/0", "prompt": prompt, "completion": "    return x + 1\n", "is_correct": True},
        {"task_id": "T/0", "prompt": prompt, "completion": "    return x - 1\n", "is_correct": False},
        {"task_id": "T/0", "prompt": prompt, "completion": "    return x + 2\n", "is_correct": False},
        {"task_id": "T/1", "prompt": prompt, "completion": "    return 0\n", "is_correct": False},
    ]
    path = tmp_path / "mutants.jsonl"
    path.write_text("".join(json.dumps({**r, "difficulty": 1}) + "\n" for r in records))
    tokenizer = ByteTokenizer()
    metrics = critic.critic_report(critic_model, tokenizer, path, critic.CriticOptions(), tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "critic_records.jsonl").read_text().splitlines()]
    n_context = 1 + len(prompt)
    assert [r["mutated_position"] for r in rows] == [None, n_context + 13, n_context + 15, None]
    expected = []
    with torch.no_grad():
        for r, row in zip(records[1:3], rows[1:3]):
            ids = [tokenizer.bos_id, *tokenizer.encode(prompt + r["completion"]), tokenizer.eos_id]
            v = critic_model.trunk_forward(torch.tensor([ids])).values[0, :, 0]
            w = build_weights(compute_td_errors(v[None], torch.tensor([0.0])))[0]
            expected.append(float(w[row["mutated_position"] - 1]))  # token x_s is weighted by w[s - 1]
    assert [row["weight_mutated_token"] for row in rows[1:3]] == pytest.approx(expected, abs=1e-5)
    assert metrics["n_mutated_tokens"] == 2
    assert metrics["mean_weight_mutated_token"] == pytest.approx(np.mean(expected), abs=1e-5)
