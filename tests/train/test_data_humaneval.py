import ast
import json
import threading
import time

import pytest

from wmtp_train.data import humaneval
from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.data.humaneval import (
    BuildParams,
    assign_difficulties,
    build_humaneval,
    checking_program,
    ensure_default_dataset,
    load_problems,
    split_task_ids,
)
from wmtp_train.data.mutate import MUTATION_KINDS, mutate_body, normalize_body
from wmtp_train.data.sandbox import run_program
from wmtp_train.data.tokenizer import ByteTokenizer

BODY = """\
    total = 0
    for i in range(1, len(xs)):
        if xs[i] > xs[i - 1] and i % 2 == 0:
            total += xs[i] * 2
    return total
"""


def test_mutants_are_valid_distinct_and_deterministic():
    mutants = mutate_body(BODY, 100, seed=3)
    assert len(mutants) >= 15
    bodies = [m.body for m in mutants]
    assert len(set(bodies)) == len(bodies)
    assert normalize_body(BODY) not in bodies
    for body in bodies:
        compile("def f(xs):\n" + body, "<m>", "exec")
    assert {m.kind for m in mutants} == set(MUTATION_KINDS)
    assert mutate_body(BODY, 100, seed=3) == mutants
    assert [m.body for m in mutate_body(BODY, 5, seed=4)] != bodies[:5]
    assert mutate_body(BODY, 5, seed=3) == mutants[:5]


def test_mutants_change_behaviour_of_the_function():
    namespace = {}
    exec("def f(xs):\n" + normalize_body(BODY), namespace)
    reference = namespace["f"]
    inputs = [[1, 5, 2, 8, 3, 9], [0, 1, 2, 3, 4], [5, 4, 3, 2, 1, 0, 7]]
    changed = 0
    for mutant in mutate_body(BODY, 20, seed=0):
        ns = {}
        exec("def f(xs):\n" + mutant.body, ns)
        outputs = []
        for xs in inputs:
            try:
                outputs.append(ns["f"](xs))
            except Exception as exc:
                outputs.append(type(exc))
        changed += outputs != [reference(xs) for xs in inputs]
    assert changed >= 15


def test_mutation_edge_cases():
    assert mutate_body("    pass\n", 5) == []
    assert mutate_body(BODY, 0) == []
    with pytest.raises(ValueError, match="body"):
        mutate_body("    return (\n", 3)
    # f-string internals are left alone; the surrounding code is still mutated.
    for mutant in mutate_body("    x = 1\n    return f'{x:>3}'\n", 10):
        assert "f'{x:>3}'" in mutant.body or mutant.kind in ("return_change", "statement_deletion")


def test_difficulty_and_split_are_deterministic_and_complete():
    problems = load_problems()
    assert len(problems) == 164
    levels = assign_difficulties(problems)
    assert sorted(set(levels.values())) == list(range(1, 12))
    counts = [list(levels.values()).count(d) for d in range(1, 12)]
    assert max(counts) - min(counts) <= 1
    assert assign_difficulties(problems) == levels
    train, heldout = split_task_ids(problems, 0.2)
    assert len(heldout) == round(0.2 * 164) and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(problems)
    assert split_task_ids(reversed(list(problems)), 0.2) == (train, heldout)


def toy_problem(task_id, solution):
    return {
        "task_id": task_id,
        "prompt": "def add(a, b):\n    '''Add two numbers.'''\n",
        "canonical_solution": solution,
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    }


def test_builder_labels_by_running_tests_and_splits_by_task(tmp_path):
    problems = load_problems()
    problems["Toy/0"] = toy_problem("Toy/0", "    return a + b\n")
    problems["Toy/1"] = toy_problem("Toy/1", "    result = a\n    result += b\n    return result\n")
    chosen = ["HumanEval/0", "HumanEval/2", "Toy/0", "Toy/1"]
    params = BuildParams(mutants=3, seed=1, heldout_fraction=0.5, timeout_s=10)
    summary = build_humaneval(tmp_path / "a", params, workers=2, problems=problems, task_ids=chosen)
    assert summary.n_problems == 4 and summary.canonical_failures == []
    rows = {}
    for split in ("train", "heldout"):
        with open(tmp_path / "a" / f"{split}.jsonl") as f:
            rows[split] = [json.loads(line) for line in f]
    train_tasks = {r["task_id"] for r in rows["train"]}
    heldout_tasks = {r["task_id"] for r in rows["heldout"]}
    assert len(train_tasks) == len(heldout_tasks) == 2 and not train_tasks & heldout_tasks
    all_rows = rows["train"] + rows["heldout"]
    assert sum(r["variant"] == "canonical" for r in all_rows) == 4
    assert any(not r["is_correct"] for r in all_rows)
    levels = assign_difficulties(problems)
    for row in all_rows:
        assert row["difficulty"] == levels[row["task_id"]]
        ast.parse(row["prompt"] + row["completion"])
        # The label is what running the problem's tests says.
        verdict = run_program(checking_program(problems[row["task_id"]], row["completion"]), timeout_s=10)
        assert verdict.passed == row["is_correct"], row
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["params"]["mutants"] == 3
    counted = sum(c["correct"] + c["incorrect"] for c in manifest["summary"]["by_split_label"].values())
    assert counted == len(all_rows)
    ds = LazyJsonlDataset(tmp_path / "a" / "train.jsonl", ByteTokenizer(), max_len=512)
    assert len(ds) == len(rows["train"])
    # Deterministic: a second build writes identical files.
    build_humaneval(tmp_path / "b", params, workers=1, problems=problems, task_ids=chosen)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_cli_builds_a_small_set(tmp_path, capsys):
    from wmtp_train.data.__main__ import main

    assert main(["build-humaneval", "--out", str(tmp_path), "--mutants", "1", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "problems: 2" in out and "difficulty" in out and "canonical" in out
    assert (tmp_path / "manifest.json").is_file()


def test_ensure_default_dataset_caches_and_survives_concurrent_builders(tmp_path, monkeypatch):
    calls = []

    def fake_build(out_dir, params, workers=None):
        calls.append(out_dir)
        time.sleep(0.2)  # widen the race window
        for name in ("train.jsonl", "heldout.jsonl"):
            (out_dir / name).write_text(json.dumps({"builder": str(out_dir)}) + "\n")
        (out_dir / "manifest.json").write_text("{}")
        return humaneval.BuildSummary()

    monkeypatch.setattr(humaneval, "build_humaneval", fake_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_default_dataset(tmp_path))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 3 and len(set(results)) == 1
    data = results[0]
    assert data.train_path.parent.name.startswith("humaneval-")
    # The surviving directory is one builder's complete output; no staging directory is left.
    builder = json.loads(data.train_path.read_text())["builder"]
    assert json.loads(data.heldout_path.read_text())["builder"] == builder
    assert [p.name for p in tmp_path.iterdir()] == [data.train_path.parent.name]
    # Cached: no rebuild; other parameters get another entry.
    assert ensure_default_dataset(tmp_path) == data and len(calls) == 3
    other = ensure_default_dataset(tmp_path, BuildParams(mutants=2))
    assert other != data and len(calls) == 4
    monkeypatch.setenv("WMTP_DATA_DIR", str(tmp_path / "env"))
    assert ensure_default_dataset().train_path.is_relative_to(tmp_path / "env")
