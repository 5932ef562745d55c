"""The comparison: per seed, a base model pre-trained with plain MTP on the ``pretrain`` split, the
``verifiable`` critic (stage 1 on the frozen base trunk), every recipe's stage 2 from the base on the
``train`` split with the same token budget, and the evaluation of each model; then the report
(:mod:`wmtp_train.experiment.report`).

Layout under ``out``: ``data/`` (built when no data directory is given), ``heldout_records.jsonl`` (the
critic report's records), ``seed<S>/{base,critic,<recipe>}/`` (trainer run directories, each with
``eval/`` and a ``phase.json`` per finished phase), ``results.json``, ``report.md``, ``report.png``.
Phases run ``jobs`` at a time (:func:`run_tasks`), each as soon as the model it starts from exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.data.synthetic_build import build_synthetic, records_path
from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.experiment import measure
from wmtp_train.experiment.protocol import (
    RECIPE_WEIGHTING,
    Protocol,
    check_recipes,
    expected_tokens_per_sample,
    steps_for,
)
from wmtp_train.experiment.report import write_report
from wmtp_train.experiment.runs import (
    TrainerRun,
    common_overrides,
    critic_overrides,
    run_phase,
    stage2_overrides,
    train,
)

MAX_LEN = 384
"""Tokens per record: the recipes' ``data.max_len`` (every synthetic record fits)."""


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def ensure_data(data_dir: Path | None, out: Path, protocol: Protocol) -> Path:
    """The ``build-synthetic`` directory to use: ``data_dir``, or one built under ``out/data`` with the
    protocol's problem count and split fractions."""
    if data_dir is not None:
        if not records_path(data_dir, "train").is_file():
            raise FileNotFoundError(f"data: no train.jsonl in {data_dir} (build it with build-synthetic)")
        return data_dir
    built = out / "data"
    run_phase(
        built,
        f"data: build-synthetic ({protocol.problems} problems)",
        lambda: build_synthetic(built, protocol.data_params()),
        _log,
    )
    return built


def plan_steps(data_dir: Path, protocol: Protocol, recipes: Sequence[str]) -> dict[str, Any]:
    """Steps of the base model and of each recipe's stage 2 for the protocol's token budgets.

    Returns:
        ``{"base": steps, "recipes": {recipe: steps}, "tokens_per_sample": {...}}``.
    """
    tokenizer = ByteTokenizer()
    pretrain = LazyJsonlDataset(records_path(data_dir, "pretrain"), tokenizer, MAX_LEN)
    train_set = LazyJsonlDataset(records_path(data_dir, "train"), tokenizer, MAX_LEN)
    per_sample = {"base": expected_tokens_per_sample(pretrain, "uniform")}
    per_sample |= {r: expected_tokens_per_sample(train_set, RECIPE_WEIGHTING[r]) for r in recipes}
    batch = protocol.micro_batch_size
    return {
        "base": steps_for(protocol.pretrain_tokens, protocol.pretrain_micro_batch_size, per_sample["base"]),
        "recipes": {r: steps_for(protocol.finetune_tokens, batch, per_sample[r]) for r in recipes},
        "tokens_per_sample": per_sample,
    }


@dataclass(frozen=True)
class Task:
    """One phase of the comparison: ``work`` runs once every task named in ``after`` has finished."""

    name: str
    after: tuple[str, ...]
    work: Callable[[], None]


def run_tasks(tasks: Sequence[Task], jobs: int) -> None:
    """Run ``tasks`` with at most ``jobs`` at a time, each as soon as its dependencies are done (in list
    order among the ready ones); the first failure stops new starts and is raised once the running ones end.
    """
    names = {task.name for task in tasks}
    unknown = {dep for task in tasks for dep in task.after} - names
    if unknown:
        raise ValueError(f"tasks depend on unknown tasks {sorted(unknown)}")
    pending, done, running = list(tasks), set(), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for task in [t for t in pending if set(t.after) <= done][: jobs - len(running)]:
                pending.remove(task)
                running[pool.submit(task.work)] = task.name
            if not running:
                raise ValueError(f"tasks {[t.name for t in pending]} wait on each other")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()
                done.add(running.pop(future))


def bases_first(tasks: Sequence[Task]) -> list[Task]:
    """``tasks`` with every seed's base model first (order otherwise kept): the bases are the longest
    phases and everything else waits on one, so a base started last would run alone at the end."""
    return sorted(tasks, key=lambda task: not task.name.endswith("/base"))


def seed_tasks(
    seed: int,
    recipes: Sequence[str],
    protocol: Protocol,
    data_dir: Path,
    out: Path,
    steps: dict,
    threads: int,
    results: dict[str, Any],
) -> list[Task]:
    """The phases of one seed: the base model, then every recipe from it (``verifiable`` after its critic);
    each trains and then evaluates its model, filling ``results[run name]`` with ``train``, ``eval``,
    ``train_wall_s`` and ``eval_wall_s``."""
    root = out / f"seed{seed}"
    common = common_overrides(seed, threads, protocol.mixed_precision)
    pretrain, train_data = records_path(data_dir, "pretrain"), records_path(data_dir, "train")
    critic_data = out / "heldout_records.jsonl"

    def phase(name: str, run: TrainerRun, generate: bool = True, critic: bool = False) -> Callable[[], None]:
        def work() -> None:
            record = run_phase(
                run.out, f"seed {seed}: train {name}", lambda: train(run, protocol.preset), _log
            )
            results[name] = {"train_wall_s": record["wall_s"], "train": measure.training_summary(run.out)}
            evaluation = run.out / "eval"

            def evaluate() -> dict[str, Any]:
                records = critic_data if critic else None
                return measure.evaluate_model(
                    run.out, data_dir, protocol, evaluation, seed, records, generate
                )

            record = run_phase(evaluation, f"seed {seed}: evaluate {name}", evaluate, _log)
            results[name] |= {
                "eval": {k: v for k, v in record.items() if k not in ("wall_s", "load_average")},
                "eval_wall_s": record["wall_s"],
            }

        return work

    def task(name: str, after: tuple[str, ...], work: Callable[[], None]) -> Task:
        return Task(f"seed{seed}/{name}", tuple(f"seed{seed}/{a}" for a in after), work)

    base_overrides = (
        *common,
        *stage2_overrides(protocol, steps["base"], protocol.pretrain_lr, protocol.pretrain_micro_batch_size),
    )
    tasks = [
        task("base", (), phase("base", TrainerRun("baseline", root / "base", pretrain, None, base_overrides)))
    ]
    base = root / "base" / "export"
    for recipe in recipes:
        recipe_steps = steps["recipes"][recipe]
        overrides = (
            *common,
            *stage2_overrides(protocol, recipe_steps, protocol.finetune_lr, protocol.micro_batch_size),
        )
        if recipe == "verifiable":
            critic_overrides_ = (*common, *critic_overrides(protocol))
            critic = TrainerRun(
                recipe, root / "critic", train_data, base, critic_overrides_, protocol.critic_steps
            )
            # The critic's trunk is the base's (frozen): its generations would be the base model's.
            tasks.append(task("critic", ("base",), phase("critic", critic, generate=False, critic=True)))
            run = TrainerRun(
                recipe,
                root / recipe,
                train_data,
                root / "critic" / "export",
                (*overrides, "stage1.enabled=false"),
            )
            tasks.append(task(recipe, ("critic",), phase(recipe, run, critic=True)))
        else:
            run = TrainerRun(recipe, root / recipe, train_data, base, overrides)
            tasks.append(task(recipe, ("base",), phase(recipe, run)))
    return tasks


def run_experiment(
    recipes: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    protocol: Protocol,
    data_dir: Path | None = None,
    threads: int = 1,
    jobs: int = 1,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """The whole comparison; writes ``results.json``, ``report.md`` and ``report.png`` under ``out``.

    Args:
        recipes: recipes to compare (:data:`~wmtp_train.experiment.protocol.RECIPE_WEIGHTING`).
        seeds: one base model and one run per recipe each.
        out: output directory (an interrupted comparison continues from its finished phases).
        protocol: budgets and evaluation sizes.
        data_dir: a ``build-synthetic`` directory (default: built under ``out/data``).
        threads: torch threads per process (1 is fastest on a CPU shared with other jobs).
        jobs: phases at a time (trainer processes and evaluations; 2 uses both cores of this machine).
        log: progress printer.

    Returns:
        The results (also in ``results.json``).
    """
    recipes = check_recipes(list(recipes))
    if not seeds:
        raise ValueError("seeds is empty")
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    torch.set_num_threads(threads)  # the evaluations run in this process
    out.mkdir(parents=True, exist_ok=True)
    start, load_before = time.monotonic(), os.getloadavg()
    data_dir = ensure_data(data_dir, out, protocol)
    measure.heldout_records(data_dir, out / "heldout_records.jsonl", protocol.critic_problems)
    steps = plan_steps(data_dir, protocol, recipes)
    log(f"steps: base {steps['base']}, stage 2 {steps['recipes']}")
    runs: dict[str, dict[str, Any]] = {f"seed{seed}": {} for seed in seeds}
    tasks = [
        task
        for seed in seeds
        for task in seed_tasks(seed, recipes, protocol, data_dir, out, steps, threads, runs[f"seed{seed}"])
    ]
    run_tasks(bases_first(tasks), jobs)
    order = ["base", "critic", *recipes]
    runs = {seed: {name: found[name] for name in order if name in found} for seed, found in runs.items()}
    results = {
        "protocol": dataclasses.asdict(protocol),
        "recipes": list(recipes),
        "seeds": list(seeds),
        "data_dir": str(data_dir),
        "threads": threads,
        "jobs": jobs,
        "steps": steps,
        "runs": runs,
        "wall_s": time.monotonic() - start,
        "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
    }
    measure.add_greedy_details(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out / "report.md", out / "report.png")
    log(f"done in {results['wall_s'] / 60:.1f} min: {out / 'report.md'}")
    return results
