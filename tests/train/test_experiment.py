"""The recipe comparison (``python -m wmtp_train.experiment``): token budgets, the report's statistics, and
(slow) the whole ``--quick`` protocol end to end."""

import dataclasses
import json
import math
import struct

import numpy as np
import pytest

from wmtp_train.data.__main__ import main as data_main
from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.data.synthetic import HELDOUT_SPLITS
from wmtp_train.data.synthetic_build import records_path
from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.eval.critic import AUC_BY_VARIANT
from wmtp_train.experiment.__main__ import build_parser, parse_override
from wmtp_train.experiment.__main__ import main as experiment_main
from wmtp_train.experiment.driver import MAX_LEN, plan_steps
from wmtp_train.experiment.protocol import QUICK, Protocol, check_recipes, expected_tokens_per_sample
from wmtp_train.experiment.report import (
    confidence_interval,
    discordant_problems,
    markdown,
    mean_std,
    paired_differences,
    sign_test,
    write_report,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert data_main(["build-synthetic", "--out", str(out), "--problems", "40", "--seed", "3"]) == 0
    return out


def test_expected_tokens_follow_the_records_each_recipe_draws(built):
    dataset = LazyJsonlDataset(records_path(built, "train"), ByteTokenizer(), MAX_LEN)
    lengths = np.array([len(dataset[i].input_ids) for i in range(len(dataset))], dtype=float)
    correct = dataset.index.is_correct.astype(bool)
    everything = expected_tokens_per_sample(dataset, "uniform")
    only_correct = expected_tokens_per_sample(dataset, "correct_only")
    assert lengths.min() <= everything <= lengths.max()
    assert lengths[correct].min() <= only_correct <= lengths[correct].max()
    # A mutant deletes or changes code, so correct records are longer on average; the curriculum keeps
    # the expectation within the range of its buckets' means.
    assert only_correct != pytest.approx(everything, rel=1e-6)


def test_every_recipe_gets_the_same_token_budget(built):
    protocol = Protocol(
        finetune_tokens=50_000, pretrain_tokens=80_000, micro_batch_size=4, pretrain_micro_batch_size=2
    )
    recipes = ["baseline", "correct_only", "verifiable", "rho1_weighted"]
    steps = plan_steps(built, protocol, recipes)
    per_sample = steps["tokens_per_sample"]
    for recipe in recipes:
        spent = steps["recipes"][recipe] * protocol.micro_batch_size * per_sample[recipe]
        assert spent == pytest.approx(protocol.finetune_tokens, rel=0.05), recipe
    assert steps["base"] * 2 * per_sample["base"] == pytest.approx(80_000, rel=0.05)
    # Recipes that sample every record draw the same batches: same number of steps.
    assert len({steps["recipes"][r] for r in ("baseline", "verifiable", "rho1_weighted")}) == 1


def test_overrides_and_recipes_are_checked():
    assert parse_override("finetune_tokens=3e5") == ("finetune_tokens", 300_000)
    assert parse_override("critic_lr=0.01") == ("critic_lr", 0.01)
    assert parse_override("greedy_problems=none") == ("greedy_problems", None)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_override("no_such_field=1")
    with pytest.raises(ValueError, match="expected int"):
        parse_override("finetune_tokens=many")
    with pytest.raises(ValueError, match="finetune_tokens"):
        Protocol(finetune_tokens=0)
    with pytest.raises(ValueError, match="critic_value_head must be one of"):
        Protocol(critic_value_head="hazzard")
    with pytest.raises(ValueError, match="critic_sampler must be one of"):
        Protocol(critic_sampler="balance")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        Protocol(mixed_precision="fp16")
    with pytest.raises(ValueError, match="non-empty subset"):
        check_recipes(["baseline", "sft"])
    assert check_recipes(["verifiable", "baseline", "verifiable"]) == ["verifiable", "baseline"]
    default = build_parser().parse_args(["--out", "x"]).recipes.split(",")
    assert check_recipes(default) == ["baseline", "correct_only", "verifiable"]
    assert experiment_main(["--out", "/nonexistent/x", "--recipes", "nope"]) == 2


def fake_results(pass1: dict[str, list[float]]) -> dict:
    """A results.json-shaped dict: greedy pass@1 on the first held-out split per recipe and seed."""
    recipes = [r for r in pass1 if r != "base"]
    runs = {}
    for seed in range(len(pass1["base"])):
        runs[f"seed{seed}"] = {
            run: {
                "eval": {"greedy": {f"pass@1/{HELDOUT_SPLITS[0]}": values[seed]}},
                "train": {"stage2": {"tokens": 1000.0, "curve": [(0.0, 2.0), (1000.0, 1.0)]}},
                "train_wall_s": 10.0,
                "eval_wall_s": 1.0,
            }
            for run, values in pass1.items()
        }
    return {
        "protocol": {
            "samples": 5,
            "preset": "micro",
            "finetune_tokens": 1000,
            "pretrain_tokens": 2000,
            "micro_batch_size": 16,
        },
        "recipes": recipes,
        "seeds": list(range(len(pass1["base"]))),
        "threads": 1,
        "runs": runs,
        "wall_s": 60.0,
        "load_average": {"start": 1.0, "end": 2.0},
    }


def test_report_means_stds_and_paired_differences(tmp_path):
    values = {
        "base": [0.1, 0.1, 0.1],
        "baseline": [0.2, 0.4, 0.3],
        "correct_only": [0.5, 0.5, 0.8],
        "verifiable": [0.3, 0.6, 0.3],
    }
    results = fake_results(values)
    metric = f"pass@1/{HELDOUT_SPLITS[0]}"
    diffs = paired_differences(results, "verifiable", "baseline", "greedy", metric)
    assert diffs == pytest.approx([0.1, 0.2, 0.0])
    assert mean_std(diffs) == pytest.approx((0.1, 0.1))
    assert mean_std([0.5]) == (0.5, 0.0) and all(math.isnan(x) for x in mean_std([]))
    text = markdown(results)
    # Results written before the base had its own batch size: it was the recipes'.
    assert "1,000 tokens per recipe at batch 16; base model 2,000 tokens at batch 16." in text
    results["protocol"]["pretrain_micro_batch_size"] = 8
    assert "base model 2,000 tokens at batch 8." in markdown(results)
    assert "| baseline | 0.300 ± 0.100 |" in text
    assert "| correct_only | 0.600 ± 0.173 |" in text
    # t(0.975, 2 df) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.248.
    assert confidence_interval(diffs) == pytest.approx((0.1 - 0.2484, 0.1 + 0.2484), abs=1e-4)
    assert (
        "| verifiable − baseline | 0.100 ± 0.100 (+0.100, +0.200, +0.000; 95% CI -0.148 to +0.348) |" in text
    )
    assert (
        "| verifiable − correct_only | -0.200 ± 0.300 (-0.200, +0.100, -0.500; 95% CI -0.945 to +0.545) |"
        in text
    )
    assert "rho1_weighted −" not in text and "− rho1_weighted" not in text
    with_rho1 = markdown(fake_results({**values, "rho1_weighted": [0.4, 0.4, 0.4]}))
    assert "| rho1_weighted − baseline | 0.100 ± 0.100 (+0.200, +0.000, +0.100;" in with_rho1
    assert "| verifiable − rho1_weighted | 0.000 ± 0.173 (-0.100, +0.200, -0.100;" in with_rho1
    assert "| rho1_weighted − correct_only | -0.200 ± 0.173 (-0.100, -0.100, -0.400;" in with_rho1
    write_report(results, tmp_path / "report.md", tmp_path / "report.png")
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 1000 and height > 300
    assert "![pass@1 and training curves](report.png)" in (tmp_path / "report.md").read_text()


def test_report_shows_the_critics_auc_per_variant():
    results = fake_results({"base": [0.1, 0.1], "verifiable": [0.2, 0.3]})
    assert "Which mistakes" not in markdown(results)  # results without the per-variant figures
    for seed, (swap, constant) in enumerate([(0.9, 0.5), (1.0, 0.7)]):
        results["runs"][f"seed{seed}"]["critic"] = {
            "train": {"stage1": {"tokens": 500.0}},
            "train_wall_s": 5.0,
            "eval_wall_s": 1.0,
            "eval": {
                "critic": {
                    "auc_last_value": 0.8,
                    f"{AUC_BY_VARIANT}mutant:operator_swap": swap,
                    f"{AUC_BY_VARIANT}mutant:constant_change": constant,
                }
            },
        }
    text = markdown(results)
    assert "| critic | `mutant:constant_change` | `mutant:operator_swap` |" in text
    assert "| after stage 1 (frozen base trunk) | 0.600 ± 0.141 | 0.950 ± 0.071 |" in text
    # verifiable's own critic (after stage 2) has no per-variant figures here: a row in the critic table
    # above, none in this one.
    assert text.count("| after stage 1 (frozen base trunk) |") == 2
    assert text.count("| after stage 2 |") == 1


def test_per_problem_sign_test(tmp_path):
    # 3 against 21 discordant problems: 2 * (C(24,0) + C(24,1) + C(24,2) + C(24,3)) / 2^24 = 2.77e-4
    assert sign_test(3, 21) == pytest.approx(2 * 2325 / 2**24)
    assert sign_test(21, 3) == sign_test(3, 21)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)
    pass1 = {"base": [0.1, 0.1], "baseline": [0.2, 0.2], "correct_only": [0.5, 0.5], "verifiable": [0.3, 0.3]}
    results = fake_results(pass1)
    split = HELDOUT_SPLITS[0]
    solved = {"baseline": ["a"], "correct_only": ["a", "b", "c"], "verifiable": ["a", "d"]}
    assert "p = " not in markdown(results)  # no per-problem outcomes recorded: no table
    for seed_runs in results["runs"].values():
        for run, ids in solved.items():
            seed_runs[run]["eval"]["greedy"][f"solved/{split}"] = ids
    assert discordant_problems(results, "verifiable", "correct_only", split) == (2, 4)  # d twice; b, c twice
    assert discordant_problems(results, "verifiable", "baseline", split) == (2, 0)
    text = markdown(results)
    assert f"| verifiable − correct_only | 2 / 4 (p = {sign_test(2, 4):.4f}) |" in text
    for seed_runs in results["runs"].values():  # 10 problems per seed only verifiable solves: p = 2 / 2^20
        seed_runs["verifiable"]["eval"]["greedy"][f"solved/{split}"] = ["a", *map(str, range(10))]
    assert "| verifiable − baseline | 20 / 0 (p < 0.0001) |" in markdown(results)


def test_solved_problems_reads_the_greedy_records(tmp_path):
    from wmtp_train.experiment.measure import solved_problems

    rows = [("T/2", HELDOUT_SPLITS[0], 1), ("T/1", HELDOUT_SPLITS[0], 1), ("T/3", HELDOUT_SPLITS[1], 0)]
    lines = [json.dumps({"task_id": t, "split": split, "passed": passed}) for t, split, passed in rows]
    (tmp_path / "synthetic_records.jsonl").write_text("\n".join(lines) + "\n")
    first, second = (f"solved/{split}" for split in HELDOUT_SPLITS)
    assert solved_problems(tmp_path) == {first: ["T/1", "T/2"], second: []}


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    """``--quick`` (one seed): every recipe trains from the same base on the same token budget, the data
    order is shared, every figure the report shows is a measured one, and the critic figures are sane."""
    out = tmp_path / "exp"
    recipes = ["baseline", "correct_only", "verifiable", "rho1_weighted"]
    assert experiment_main(["--quick", "--recipes", ",".join(recipes), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipes"] == recipes and results["seeds"] == [0]
    seed = results["runs"]["seed0"]
    budget = QUICK.finetune_tokens
    for recipe in recipes:
        stage2 = seed[recipe]["train"]["stage2"]
        assert stage2["tokens"] == pytest.approx(budget, rel=0.15), recipe
        assert stage2["steps"] == results["steps"]["recipes"][recipe]
        for split in HELDOUT_SPLITS:
            greedy = seed[recipe]["eval"]["greedy"][f"pass@1/{split}"]
            sampled = seed[recipe]["eval"]["sampled"]
            assert 0.0 <= greedy <= 1.0
            assert sampled[f"pass@1/{split}"] <= sampled[f"pass@{QUICK.samples}/{split}"] + 1e-9
    assert "stage1" not in seed["verifiable"]["train"] and "stage1" in seed["critic"]["train"]
    # Recipes sampling every record drew the same records: equal stage-2 token counts to the token.
    same_order = [seed[r]["train"]["stage2"]["tokens"] for r in ("baseline", "verifiable", "rho1_weighted")]
    assert len(set(same_order)) == 1
    # The base model was pre-trained (its loss fell) and fine-tuning moved every recipe away from it.
    base_curve = [v for _, v in seed["base"]["train"]["stage2"]["curve"]]
    assert base_curve[-1] < 0.5 * base_curve[0]
    # The per-problem files agree with the reported pass@1, on the protocol's number of problems.
    for recipe in ("base", *recipes):
        lines = (out / "seed0" / recipe / "eval" / "greedy" / "synthetic_records.jsonl").read_text()
        rows = [json.loads(line) for line in lines.splitlines()]
        for split in HELDOUT_SPLITS:
            passed = [row["passed"] for row in rows if row["split"] == split]
            assert len(passed) == QUICK.greedy_problems
            assert seed[recipe]["eval"]["greedy"][f"pass@1/{split}"] == pytest.approx(np.mean(passed))
    critic = seed["critic"]["eval"]["critic"]
    assert 0.0 <= critic["auc_last_value"] <= 1.0
    assert critic["explained_variance"] <= critic["explained_variance_ceiling"] + 1e-9
    assert critic["n_mutated_tokens"] > 0
    assert any(key.startswith(f"{AUC_BY_VARIANT}mutant:") for key in critic)
    report = (out / "report.md").read_text()
    mean = seed["correct_only"]["eval"]["greedy"][f"pass@1/{HELDOUT_SPLITS[0]}"]
    assert f"| correct_only | {mean:.3f} |" in report
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_tasks_run_after_their_dependencies_and_failures_surface():
    import threading
    import time

    from wmtp_train.experiment.driver import Task, run_tasks

    events, lock, active, peak = [], threading.Lock(), [0], [0]

    def work(name):
        def run():
            with lock:
                events.append(("start", name))
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
                events.append(("end", name))

        return run

    tasks = [
        Task("a", (), work("a")),
        Task("b", ("a",), work("b")),
        Task("c", ("a",), work("c")),
        Task("d", ("b", "c"), work("d")),
        Task("e", (), work("e")),
    ]
    run_tasks(tasks, jobs=2)
    order = {event: i for i, event in enumerate(events)}
    for task in tasks:
        for dep in task.after:
            assert order[("end", dep)] < order[("start", task.name)], (dep, task.name)
    assert peak[0] == 2 and len(events) == 10
    with pytest.raises(ValueError, match="unknown"):
        run_tasks([Task("x", ("y",), work("x"))], jobs=1)
    with pytest.raises(ValueError, match="wait on each other"):
        run_tasks([Task("x", ("y",), work("x")), Task("y", ("x",), work("y"))], jobs=1)

    def fail():
        raise RuntimeError("trainer failed")

    with pytest.raises(RuntimeError, match="trainer failed"):
        run_tasks([Task("x", (), fail), Task("y", ("x",), work("y"))], jobs=2)
    assert ("start", "y") not in events[10:]


def test_every_seeds_base_starts_before_any_recipe(tmp_path):
    """Three seeds on two jobs: the third base starts before the first two seeds' recipes, not after them."""
    from wmtp_train.experiment.driver import bases_first, run_tasks, seed_tasks

    steps = {"base": 1, "recipes": {"baseline": 1, "verifiable": 1}}
    tasks = [
        task
        for seed in range(3)
        for task in seed_tasks(seed, ["baseline", "verifiable"], QUICK, tmp_path, tmp_path, steps, 1, {})
    ]
    ordered = bases_first(tasks)
    assert [t.name for t in ordered[:3]] == ["seed0/base", "seed1/base", "seed2/base"]
    assert [t.name for t in ordered[3:]] == [t.name for t in tasks if not t.name.endswith("/base")]
    starts = []
    run_tasks([dataclasses.replace(t, work=lambda name=t.name: starts.append(name)) for t in ordered], jobs=2)
    assert starts[:3] == ["seed0/base", "seed1/base", "seed2/base"] and len(starts) == len(tasks)


def trainer_settings(protocol, tmp_path, monkeypatch):
    """The ``--set`` values of seed 0's base, baseline, critic and verifiable trainer commands."""
    from wmtp_train.experiment import driver

    commands = []

    def record(run, preset):
        commands.append(run.command(preset))
        raise InterruptedError  # stop each phase before its evaluation

    monkeypatch.setattr(driver, "train", record)
    steps = {"base": 1, "recipes": {"baseline": 1, "verifiable": 1}}
    for task in driver.seed_tasks(0, ["baseline", "verifiable"], protocol, tmp_path, tmp_path, steps, 1, {}):
        with pytest.raises(InterruptedError):
            task.work()
    assert len(commands) == 4
    return [[command[i + 1] for i, arg in enumerate(command) if arg == "--set"] for command in commands]


@pytest.mark.parametrize("precision", ["bf16", "none"])
def test_every_training_run_gets_the_protocols_precision(precision, tmp_path, monkeypatch):
    protocol = dataclasses.replace(QUICK, mixed_precision=precision)
    for settings in trainer_settings(protocol, tmp_path, monkeypatch):
        assert [s for s in settings if s.startswith("parallel.mixed_precision=")] == [
            f"parallel.mixed_precision={precision}"
        ]


def test_the_base_trains_with_its_own_batch_size(tmp_path, monkeypatch):
    protocol = dataclasses.replace(QUICK, pretrain_micro_batch_size=3, micro_batch_size=5)
    base, baseline, critic, verifiable = trainer_settings(protocol, tmp_path, monkeypatch)
    for settings, batches in ((base, ["3"]), (baseline, ["5"]), (critic, []), (verifiable, ["5"])):
        assert [s.split("=")[1] for s in settings if s.startswith("stage2.micro_batch_size=")] == batches


def test_skeleton_ignores_literals_only(built, tmp_path):
    from wmtp_train.data.synthetic_build import load_split_problems
    from wmtp_train.experiment.measure import code_skeleton, skeleton_rates

    assert code_skeleton("    n = n + 14\n    return n\n") == code_skeleton("    n = n + 3\n    return n\n")
    assert code_skeleton("    s = s + 'ing'\n") == code_skeleton('    s = s + "x"\n')
    assert code_skeleton("    n = n + 14\n") != code_skeleton("    n = n - 14\n")
    assert code_skeleton("    n = n + 14\n") != code_skeleton("    k = n + 14\n")
    assert code_skeleton("    s = s + 'ing\n") is None
    rows = []
    for split in HELDOUT_SPLITS:
        for i, problem in enumerate(load_split_problems(built, split)):
            completion = problem["canonical_solution"]
            if split == HELDOUT_SPLITS[0]:  # every other problem gets one more operation
                completion = completion.replace("return ", "return 0 + ") if i % 2 else completion
            else:
                completion = "    return None\n"
            rows.append(
                {"split": split, "task_id": problem["task_id"], "samples": [{"completion": completion}]}
            )
    (tmp_path / "synthetic_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = skeleton_rates(tmp_path, built)
    n_first = len(load_split_problems(built, HELDOUT_SPLITS[0]))
    assert rates[f"skeleton@1/{HELDOUT_SPLITS[0]}"] == pytest.approx(((n_first + 1) // 2) / n_first)
    assert rates[f"skeleton@1/{HELDOUT_SPLITS[1]}"] == 0.0
