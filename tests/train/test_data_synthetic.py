import ast
import dataclasses
import itertools
import json
import random

import pytest

from wmtp_train.data import synthetic_build
from wmtp_train.data.__main__ import main as data_main
from wmtp_train.data.dataset import LazyJsonlDataset, collate
from wmtp_train.data.humaneval import MANIFEST_FILE, checking_program
from wmtp_train.data.index import OffsetIndex
from wmtp_train.data.records import MAX_DIFFICULTY
from wmtp_train.data.samplers import CURRICULUM_BUCKETS, CurriculumSampler
from wmtp_train.data.sandbox import run_program
from wmtp_train.data.sandbox_batch import check_programs
from wmtp_train.data.synthetic import HELDOUT_SPLITS, SPLITS, build_catalogue
from wmtp_train.data.synthetic_build import (
    SyntheticParams,
    build_synthetic,
    generate_problems,
    load_split_problems,
    problems_path,
    records_path,
)
from wmtp_train.data.synthetic_parts import (
    CATEGORIES,
    PARTS,
    PARTS_BY_NAME,
    VARIABLE_NAMES,
    heldout_values,
    training_values,
)
from wmtp_train.data.synthetic_problem import (
    DIFFICULTY_BANDS,
    MIN_MUTANTS,
    draw_constants,
    enumerate_chains,
    instantiate,
    render_solution,
    template_difficulty,
)
from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.eval.humaneval import HumanEvalOptions, score_completions
from wmtp_train.eval.metrics import mean_pass_at_k

SMALL = 40


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small build through the CLI."""
    out = tmp_path_factory.mktemp("synthetic")
    assert data_main(["build-synthetic", "--out", str(out), "--problems", str(SMALL), "--seed", "3"]) == 0
    return out


def _records(path):
    return [json.loads(line) for line in open(path)]


def _problems(data_dir):
    return {split: load_split_problems(data_dir, split) for split in SPLITS}


def test_catalogue_has_enough_templates_of_every_category():
    assert len(PARTS) >= 20
    assert {part.category for part in PARTS} == set(CATEGORIES)
    catalogue = build_catalogue(0, 60, 60, 16, 16)
    assert len(catalogue.seen) + len(catalogue.unseen) >= 30
    for depth in (2, 3):
        assert sum(len(t) == depth for t in catalogue.unseen) == 16
        assert sum(len(t) == depth for t in catalogue.seen) == 60
    # Every part is composed with others in several seen templates (not only seen alone).
    for part in PARTS:
        assert sum(part.name in t for t in catalogue.seen if len(t) > 1) >= 2, part.name


def test_unseen_compositions_share_no_adjacent_pair_with_seen_templates():
    catalogue = build_catalogue(1, 60, 60, 16, 16)
    seen_pairs = {pair for t in catalogue.seen for pair in itertools.pairwise(t)}
    unseen_pairs = {pair for t in catalogue.unseen for pair in itertools.pairwise(t)}
    assert not seen_pairs & unseen_pairs
    assert not set(catalogue.seen) & set(catalogue.unseen)


def test_every_chain_types_fit_and_solutions_have_1_to_6_lines():
    names = {kind: pool[0] for kind, pool in VARIABLE_NAMES.items()}
    for depth in (1, 2, 3):
        for chain in enumerate_chains(depth):
            parts = [PARTS_BY_NAME[name] for name in chain]
            assert all(a.out_type == b.in_type for a, b in itertools.pairwise(parts))
            constants = [{slot.name: slot.values[0] for slot in part.slots} for part in parts]
            body = render_solution(parts, constants, names)
            assert 2 <= len(body.splitlines()) <= 6, chain
            compile("def f(arg):\n" + body, "<chain>", "exec")


def test_difficulty_follows_composition_depth_and_size():
    for depth, band in DIFFICULTY_BANDS.items():
        levels = {template_difficulty(chain) for chain in enumerate_chains(depth)}
        assert levels <= set(band) and len(levels) >= 2
    assert template_difficulty(("l_sort",)) < template_difficulty(("l_double_even",))
    assert max(max(b) for b in DIFFICULTY_BANDS.values()) == MAX_DIFFICULTY


def test_held_out_constants_lie_outside_the_training_values():
    rng = random.Random(0)
    for part in PARTS:
        for slot in part.slots:
            held, train = set(heldout_values(slot, part.name, 0)), set(training_values(slot, part.name, 0))
            assert held and train and not held & train
            assert set(slot.extension) <= held and not set(slot.extension) & set(slot.values)
            if isinstance(slot.values[0], int):
                assert min(slot.extension) > max(slot.values)  # above the training range
        if part.slots:
            for _ in range(20):
                drawn = draw_constants([part], rng, 0, heldout_constant=True)[0]
                assert sum(drawn[s.name] in heldout_values(s, part.name, 0) for s in part.slots) == 1
                drawn = draw_constants([part], rng, 0, heldout_constant=False)[0]
                assert all(drawn[s.name] in training_values(s, part.name, 0) for s in part.slots)


def test_every_step_of_a_problem_matters():
    """A step that cannot change the output is never kept: upper-casing or reversing before counting 'a'."""
    rng = random.Random(0)
    for chain in (("s_upper", "s_count"), ("s_reverse", "s_count")):
        assert all(instantiate(chain, rng, [{}, {"a": "a"}]) is None for _ in range(20))
    problem = instantiate(("s_repeat", "s_count"), rng, [{"k": 3}, {"a": "a"}])
    assert problem is not None and problem.prompt.count(">>>") == 1
    assert draw_constants([PARTS_BY_NAME["s_upper"]], rng, 0, heldout_constant=True) == [{}]


def test_build_is_deterministic(built, tmp_path):
    assert (
        data_main(["build-synthetic", "--out", str(tmp_path), "--problems", str(SMALL), "--seed", "3"]) == 0
    )
    names = sorted(p.name for p in built.iterdir() if not p.name.endswith(".offsets.json"))
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name
    other, _ = generate_problems(SyntheticParams(problems=SMALL, seed=4))
    assert other != json.loads((built / MANIFEST_FILE).read_text())["catalogue"]


def test_splits_are_disjoint_and_held_out_problems_are_new(built):
    problems = _problems(built)
    sizes = SyntheticParams(problems=SMALL).split_sizes()
    assert {split: len(p) for split, p in problems.items()} == sizes
    prompts = [p["prompt"] for split in SPLITS for p in problems[split]]
    assert len(set(prompts)) == len(prompts) == SMALL
    catalogue = json.loads((built / MANIFEST_FILE).read_text())["catalogue"]
    training = [p for split in ("pretrain", "train") for p in problems[split]]
    assert {p["template"] for p in training} <= set(catalogue["seen"])
    assert {p["template"] for p in problems["heldout_problems"]} <= set(catalogue["seen"])
    assert {p["template"] for p in problems["heldout_compositions"]} <= set(catalogue["unseen"])
    # Records follow their problems: no task is in two files.
    task_splits = {}
    for split in SPLITS:
        for record in _records(records_path(built, split)):
            assert task_splits.setdefault(record["task_id"], split) == split
    assert set(task_splits) == {p["task_id"] for split in SPLITS for p in problems[split]}


def _is_heldout_constant(text: str) -> bool:
    """Whether a ``"part.slot=value"`` constant is one of its slot's held-out values (seed 5)."""
    where, value = text.split("=", 1)
    part, slot_name = where.split(".")
    slot = next(s for s in PARTS_BY_NAME[part].slots if s.name == slot_name)
    return ast.literal_eval(value) in heldout_values(slot, part, 5)


def test_held_out_problems_are_new_tasks():
    _, problems = generate_problems(SyntheticParams(problems=60, seed=5))
    training = [p for p in problems if p.split not in HELDOUT_SPLITS]
    heldout = [p for p in problems if p.split in HELDOUT_SPLITS]
    keys = {(p.template, p.constants) for p in training}
    for p in heldout:
        assert (p.template, p.constants) not in keys
        if p.split == "heldout_problems":
            assert p.constants, "a seen template is only new with other constants"
        held = [_is_heldout_constant(c) for c in p.constants]
        assert sum(held) == (1 if p.novel_constant else 0), p.constants
    assert any(p.novel_surface for p in heldout) and any(p.novel_constant for p in heldout)
    assert not any(p.novel_surface or p.novel_constant for p in training)
    seen_functions = {p.entry_point for p in training}
    assert all(p.entry_point not in seen_functions for p in heldout if p.novel_surface)


def test_records_label_every_completion_and_fit_the_loaders(built):
    tokenizer = ByteTokenizer()
    params = SyntheticParams()
    for split in SPLITS:
        path = records_path(built, split)
        records = _records(path)
        index = OffsetIndex.build(path)
        assert len(index) == len(records) and index.n_skipped == 0
        by_task: dict = {}
        for record in records:
            by_task.setdefault(record["task_id"], []).append(record)
            assert len(tokenizer.encode(record["prompt"] + record["completion"])) + 2 <= params.max_tokens
            assert (
                DIFFICULTY_BANDS[record["depth"]][0]
                <= record["difficulty"]
                <= DIFFICULTY_BANDS[record["depth"]][-1]
            )
        for task_records in by_task.values():
            canonical = [r for r in task_records if r["variant"] == "canonical"]
            assert len(canonical) == 1 and canonical[0]["is_correct"]
            mutants = [r for r in task_records if r["variant"].startswith("mutant:")]
            if split == "pretrain":
                assert not mutants
            else:
                assert MIN_MUTANTS <= len(mutants) <= params.mutants
        dataset = LazyJsonlDataset(path, tokenizer, params.max_tokens, cache_index=False)
        batch = collate([dataset[i] for i in range(min(4, len(dataset)))], tokenizer.pad_id)
        assert batch["loss_mask"].sum() > 0
    train = _records(records_path(built, "train"))
    assert any(not r["is_correct"] for r in train)
    sampler = CurriculumSampler([r["difficulty"] for r in train], total_steps=10, global_batch_size=4)
    assert len(list(sampler)) == 40
    assert {d for r in train for d in [r["difficulty"]]} & set(range(*CURRICULUM_BUCKETS["high"]))


def test_labels_equal_running_each_program_alone(built):
    """The batched sandbox labels of a build match one run_program per completion."""
    problems = {p["task_id"]: p for p in load_split_problems(built, "heldout_compositions")}
    records = _records(records_path(built, "heldout_compositions"))
    assert len(records) >= 8
    for record in records:
        result = run_program(checking_program(problems[record["task_id"]], record["completion"]))
        assert result.passed == record["is_correct"], record


def test_a_wrong_canonical_solution_is_labelled_incorrect(tmp_path, monkeypatch):
    real = synthetic_build.generate_problems

    def with_a_broken_canonical(params):
        catalogue, problems = real(params)
        victim = next(i for i, p in enumerate(problems) if p.split == "train")
        wrong = problems[victim].canonical_solution.replace("return ", "return 1 + ", 1)
        problems[victim] = dataclasses.replace(problems[victim], canonical_solution=wrong)
        return catalogue, problems

    monkeypatch.setattr(synthetic_build, "generate_problems", with_a_broken_canonical)
    summary = build_synthetic(tmp_path, SyntheticParams(problems=12, seed=0))
    assert len(summary["canonical_failures"]) == 1 and not summary["problems_with_too_few_mutants"]
    failed = summary["canonical_failures"][0]
    canonical = [
        r
        for r in _records(records_path(tmp_path, "train"))
        if r["task_id"] == failed and r["variant"] == "canonical"
    ]
    assert len(canonical) == 1 and not canonical[0]["is_correct"]


def test_problem_files_are_scored_by_the_evaluator(built):
    for split in HELDOUT_SPLITS:
        problems = load_split_problems(built, split)
        for problem in problems:
            assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problem)
            assert problem["test"].count("assert ") >= 5
            assert problem["prompt"].rstrip().endswith('"""')
        options = HumanEvalOptions(workers=2)
        right = score_completions(problems, [[p["canonical_solution"]] for p in problems], options)
        assert mean_pass_at_k([(1, int(r[0].passed)) for r in right], 1) == 1.0
        wrong = score_completions(problems, [["    return None\n"] for _ in problems], options)
        assert mean_pass_at_k([(1, int(r[0].passed)) for r in wrong], 1) == 0.0
    with pytest.raises(ValueError, match="split"):
        problems_path(built, "validation")
    with pytest.raises(FileNotFoundError, match="build-synthetic"):
        load_split_problems(built / "missing", "train")


def test_batched_sandbox_matches_single_runs_and_falls_back():
    programs = [
        "assert 1 + 1 == 2\n",
        "assert 1 + 1 == 3\n",
        "print('noise')\nraise SystemExit(0)\n",
        "raise SystemExit(2)\n",
        "while True:\n    pass\n",
        "import sys\nsys.setrecursionlimit(50)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
    ]
    outcomes, stats = check_programs(programs, cpu_s=0.5, batch_size=len(programs), workers=1)
    assert outcomes == ["pass", "fail", "pass", "fail", "timeout", "fail"]
    assert stats.sandbox_runs == 1 and stats.fallback_batches == 0
    alone, _ = check_programs(programs, cpu_s=0.5, batch_size=1, workers=2)
    assert [o == "pass" for o in alone] == [o == "pass" for o in outcomes]
    # A program that kills the harness makes its batch re-run one by one, with the same labels.
    killer = ["assert True\n", "import os\nos._exit(0)\n", "assert False\n"]
    outcomes, stats = check_programs(killer, batch_size=3, workers=1)
    assert outcomes == ["pass", "pass", "fail"]
    assert stats.fallback_batches == 1 and stats.sandbox_runs == 4
    with pytest.raises(ValueError, match="batch_size"):
        check_programs(programs, batch_size=0)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="mutants"):
        SyntheticParams(mutants=2)
    with pytest.raises(ValueError, match="split_fractions"):
        SyntheticParams(split_fractions=(0.5, 0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match="problems"):
        SyntheticParams(problems=3)
