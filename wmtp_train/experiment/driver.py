"""The comparison, seed after seed: a base model pre-trained with plain MTP on the ``pretrain`` split, the
``verifiable`` critic (stage 1 on the frozen base trunk), every recipe's stage 2 from the base on the
``train`` split with the same token budget, and the evaluation of each model; then the report
(:mod:`wmtp_train.experiment.report`).

Layout under ``out``: ``data/`` (built when no data directory is given), ``heldout_records.jsonl`` (the
critic report's records), ``seed<S>/{base,critic,<recipe>}/`` (trainer run directories, each with
``eval/`` and a ``phase.json`` per finished phase), ``results.json``, ``report.md``, ``report.png``.
Processes run one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.data.synthetic_build import SyntheticParams, build_synthetic, records_path
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


def ensure_data(data_dir: Path | None, out: Path) -> Path:
    """The ``build-synthetic`` directory to use: ``data_dir``, or a default build under ``out/data``."""
    if data_dir is not None:
        if not records_path(data_dir, "train").is_file():
            raise FileNotFoundError(f"data: no train.jsonl in {data_dir} (build it with build-synthetic)")
        return data_dir
    built = out / "data"
    run_phase(
        built,
        "data: build-synthetic (default parameters)",
        lambda: build_synthetic(built, SyntheticParams()),
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
        "base": steps_for(protocol.pretrain_tokens, batch, per_sample["base"]),
        "recipes": {r: steps_for(protocol.finetune_tokens, batch, per_sample[r]) for r in recipes},
        "tokens_per_sample": per_sample,
    }


def run_seed(
    seed: int,
    recipes: Sequence[str],
    protocol: Protocol,
    data_dir: Path,
    out: Path,
    steps: dict,
    threads: int,
) -> dict[str, Any]:
    """Train and evaluate the base model, the critic and every recipe of one seed.

    Returns:
        ``{run name: {"train": ..., "eval": ..., "train_wall_s", "eval_wall_s"}}``.
    """
    root = out / f"seed{seed}"
    common = common_overrides(seed, threads)
    pretrain, train_data = records_path(data_dir, "pretrain"), records_path(data_dir, "train")
    critic_data = out / "heldout_records.jsonl"
    results: dict[str, Any] = {}

    def trained(name: str, run: TrainerRun) -> None:
        record = run_phase(run.out, f"seed {seed}: train {name}", lambda: train(run, protocol.preset), _log)
        results[name] = {"train_wall_s": record["wall_s"], "train": measure.training_summary(run.out)}

    def evaluated(name: str, with_critic: bool = False) -> None:
        run_dir = root / name

        def work() -> dict[str, Any]:
            critic = critic_data if with_critic else None
            return measure.evaluate_model(run_dir, data_dir, protocol, run_dir / "eval", seed, critic)

        record = run_phase(run_dir / "eval", f"seed {seed}: evaluate {name}", work, _log)
        results[name] |= {
            "eval": {k: v for k, v in record.items() if k != "wall_s"},
            "eval_wall_s": record["wall_s"],
        }

    base_overrides = (*common, *stage2_overrides(protocol, steps["base"], protocol.pretrain_lr))
    trained("base", TrainerRun("baseline", root / "base", pretrain, None, base_overrides))
    evaluated("base")
    base = root / "base" / "export"
    for recipe in recipes:
        overrides = (*common, *stage2_overrides(protocol, steps["recipes"][recipe], protocol.finetune_lr))
        start = base
        if recipe == "verifiable":
            critic_run = TrainerRun(
                recipe,
                root / "critic",
                train_data,
                base,
                (*common, *critic_overrides(protocol)),
                protocol.critic_steps,
            )
            trained("critic", critic_run)
            evaluated("critic", with_critic=True)
            start, overrides = root / "critic" / "export", (*overrides, "stage1.enabled=false")
        trained(recipe, TrainerRun(recipe, root / recipe, train_data, start, overrides))
        evaluated(recipe, with_critic=recipe == "verifiable")
    return results


def run_experiment(
    recipes: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    protocol: Protocol,
    data_dir: Path | None = None,
    threads: int = 1,
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
        log: progress printer.

    Returns:
        The results (also in ``results.json``).
    """
    recipes = check_recipes(list(recipes))
    if not seeds:
        raise ValueError("seeds is empty")
    out.mkdir(parents=True, exist_ok=True)
    start, load_before = time.monotonic(), os.getloadavg()
    data_dir = ensure_data(data_dir, out)
    measure.heldout_records(data_dir, out / "heldout_records.jsonl", protocol.critic_problems)
    steps = plan_steps(data_dir, protocol, recipes)
    log(f"steps: base {steps['base']}, stage 2 {steps['recipes']}")
    runs = {f"seed{seed}": run_seed(seed, recipes, protocol, data_dir, out, steps, threads) for seed in seeds}
    results = {
        "protocol": dataclasses.asdict(protocol),
        "recipes": list(recipes),
        "seeds": list(seeds),
        "data_dir": str(data_dir),
        "threads": threads,
        "steps": steps,
        "runs": runs,
        "wall_s": time.monotonic() - start,
        "load_average": {"start": load_before[0], "end": os.getloadavg()[0]},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out / "report.md", out / "report.png")
    log(f"done in {results['wall_s'] / 60:.1f} min: {out / 'report.md'}")
    return results
