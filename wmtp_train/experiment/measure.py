"""What a comparison measures on a trained model: greedy pass@1 and sampled pass@k on the held-out splits
(:mod:`wmtp_train.eval.synthetic`), the critic report on held-out labelled records
(:mod:`wmtp_train.eval.critic`), and what the training run processed (from its ``metrics.jsonl``)."""

from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wmtp_train.data.synthetic import HELDOUT_SPLITS
from wmtp_train.data.synthetic_build import load_split_problems, records_path
from wmtp_train.eval.critic import AUC_BY_VARIANT, critic_options, critic_report
from wmtp_train.eval.humaneval import HumanEvalOptions
from wmtp_train.eval.loading import load_for_evaluation
from wmtp_train.eval.synthetic import BATCHED_PROGRAMS, evaluate_synthetic
from wmtp_train.experiment.protocol import Protocol
from wmtp_train.experiment.runs import read_metrics

CRITIC_KEYS = (
    "auc_last_value",
    "explained_variance",
    "explained_variance_ceiling",
    "mean_weight_correct",
    "mean_weight_incorrect",
    "mean_weight_mutated_token",
    "n_records",
    "n_mutated_tokens",
)
"""The critic report's figures a comparison keeps, besides its per-variant AUCs."""


def heldout_records(data_dir: Path, out: Path, problems: int | None) -> Path:
    """Write the labelled records of both held-out splits into one file (the critic report's input).

    Args:
        data_dir: the ``build-synthetic`` directory.
        out: the file to write.
        problems: keep the records of the first ``problems`` problems of each split (None: all).

    Returns:
        ``out``.
    """
    lines = []
    for split in HELDOUT_SPLITS:
        keep = {p["task_id"] for p in load_split_problems(data_dir, split)[:problems]}
        for line in records_path(data_dir, split).read_text().splitlines():
            if json.loads(line)["task_id"] in keep:
                lines.append(line + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
    return out


def evaluate_model(
    checkpoint: Path,
    data_dir: Path,
    protocol: Protocol,
    out: Path,
    seed: int,
    critic_data: Path | None = None,
    generate: bool = True,
    workers: int = 2,
) -> dict[str, Any]:
    """Greedy and sampled pass@k on the held-out splits, and the critic report when ``critic_data`` is given.

    Args:
        checkpoint: a run directory with ``export/``.
        data_dir: the ``build-synthetic`` directory.
        protocol: evaluation sizes and decoding settings.
        out: where the evaluation files go (``greedy/``, ``sampled/``, ``critic/``).
        seed: sampling seed.
        critic_data: labelled records for the critic report (its TD options are the run's own).
        generate: measure pass@k (False: the critic report alone).
        workers: sandboxed processes at a time.

    Returns:
        ``{"greedy": metrics, "sampled": metrics, "critic": metrics}`` (each only when asked).
    """
    model, tokenizer, _ = load_for_evaluation(checkpoint)
    common = {
        "max_new_tokens": protocol.max_new_tokens,
        "batch_size": 32,
        "workers": workers,
        "programs_per_sandbox": BATCHED_PROGRAMS,
        "timeout_s": 2.0,
        "seed": seed,
    }
    greedy = HumanEvalOptions(**common, limit=protocol.greedy_problems)
    sampled = HumanEvalOptions(
        **common,
        limit=protocol.sampled_problems,
        samples=protocol.samples,
        k=tuple(sorted({1, protocol.samples})),
        temperature=protocol.temperature,
        top_p=0.95,
    )
    result: dict[str, Any] = {}
    with torch.inference_mode():
        if generate:
            result["greedy"] = evaluate_synthetic(model, tokenizer, greedy, out / "greedy", data_dir)
            result["sampled"] = evaluate_synthetic(model, tokenizer, sampled, out / "sampled", data_dir)
        if critic_data is not None:
            report = critic_report(model, tokenizer, critic_data, critic_options(checkpoint), out / "critic")
            kept = (key for key in report if key in CRITIC_KEYS or key.startswith(AUC_BY_VARIANT))
            result["critic"] = {key: report[key] for key in kept}
    return result


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Tokens, steps and time per stage of a finished trainer run, and its loss curve.

    Args:
        run_dir: the trainer's ``out_dir``.

    Returns:
        ``{"stage1": {...}, "stage2": {...}}`` (stages that ran), each with ``steps``, ``tokens`` (real
        tokens processed), ``train_s`` (summed step times) and ``curve`` (``[(tokens so far in the stage,
        ce_head1 or value_loss)]`` every few steps).
    """
    history = read_metrics(run_dir)
    summary: dict[str, Any] = {}
    for stage in sorted({int(h["stage"]) for h in history}):
        steps = [h for h in history if int(h["stage"]) == stage]
        before = history[history.index(steps[0]) - 1]["tokens"] if history.index(steps[0]) else 0.0
        key = "ce_head1" if stage == 2 else "value_loss"
        every = max(1, len(steps) // 60)
        summary[f"stage{stage}"] = {
            "steps": len(steps),
            "tokens": steps[-1]["tokens"] - before,
            "train_s": float(np.sum([h["step_time_s"] for h in steps])),
            "curve": [
                (h["tokens"] - before, h[key]) for h in steps[every - 1 :: every] if h.get(key) is not None
            ],
        }
    return summary


_LAYOUT = (
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.COMMENT,
    tokenize.ENDMARKER,
)


def code_skeleton(code: str) -> list[str] | None:
    """The Python tokens of ``code`` with every number and string literal replaced by ``<lit>`` and layout
    dropped; None when ``code`` does not tokenize (an unterminated string, say)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    if any(t.type == tokenize.ERRORTOKEN and not t.string.isspace() for t in tokens):
        return None
    return [
        "<lit>" if t.type in (tokenize.NUMBER, tokenize.STRING) else t.string
        for t in tokens
        if t.type not in _LAYOUT and not t.string.isspace()
    ]


def skeleton_rates(greedy_dir: Path, data_dir: Path) -> dict[str, float]:
    """Per held-out split, the fraction of greedy completions equal to the canonical solution up to literals
    (same statements and names, constants free): what the model gets right when a test still fails on a
    copied constant.

    Args:
        greedy_dir: a greedy evaluation's directory (``synthetic_records.jsonl``).
        data_dir: the ``build-synthetic`` directory.

    Returns:
        ``{"skeleton@1/<split>": fraction}``.
    """
    canonical = {
        p["task_id"]: p["canonical_solution"]
        for split in HELDOUT_SPLITS
        for p in load_split_problems(data_dir, split)
    }
    matches: dict[str, list[bool]] = {split: [] for split in HELDOUT_SPLITS}
    for line in (greedy_dir / "synthetic_records.jsonl").read_text().splitlines():
        row = json.loads(line)
        found = code_skeleton(row["samples"][0]["completion"])
        matches[row["split"]].append(found is not None and found == code_skeleton(canonical[row["task_id"]]))
    return {f"skeleton@1/{split}": float(np.mean(m)) for split, m in matches.items() if m}


def solved_problems(greedy_dir: Path) -> dict[str, list[str]]:
    """Per held-out split, the task ids whose greedy completion passes (for per-problem paired tests).

    Args:
        greedy_dir: a greedy evaluation's directory (``synthetic_records.jsonl``).

    Returns:
        ``{"solved/<split>": sorted task ids}``.
    """
    solved: dict[str, list[str]] = {f"solved/{split}": [] for split in HELDOUT_SPLITS}
    for line in (greedy_dir / "synthetic_records.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["passed"]:
            solved[f"solved/{row['split']}"].append(row["task_id"])
    return {key: sorted(ids) for key, ids in solved.items()}


def add_greedy_details(results: dict[str, Any], out: Path) -> None:
    """Add :func:`skeleton_rates` and :func:`solved_problems` to the greedy figures of every run in
    ``results`` that has them."""
    for seed, runs in results["runs"].items():
        for name, run in runs.items():
            greedy = out / seed / name / "eval" / "greedy"
            if "greedy" in run.get("eval", {}) and greedy.is_dir():
                run["eval"]["greedy"] |= skeleton_rates(greedy, Path(results["data_dir"]))
                run["eval"]["greedy"] |= solved_problems(greedy)
