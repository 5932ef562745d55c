"""The comparison's report: per-recipe pass@k as mean ± std over seeds, paired (same-seed) differences of
``verifiable`` against ``baseline`` and ``correct_only``, the critic's figures, budgets and times, as
markdown (``report.md``) and one PNG (pass@1 with error bars, training curves)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wmtp_train.data.synthetic import HELDOUT_SPLITS
from wmtp_train.eval.critic import AUC_BY_VARIANT

PAIRS = (
    ("verifiable", "baseline"),
    ("verifiable", "correct_only"),
    ("rho1_weighted", "baseline"),
    ("rho1_weighted", "correct_only"),
    ("verifiable", "rho1_weighted"),
)
"""Paired differences reported (first minus second), when both recipes ran: the question (``verifiable``)
against uniform training and filtering, and the label-free ``rho1_weighted`` against all three."""
SHORT = {"heldout_problems": "seen templates", "heldout_compositions": "unseen compositions"}


def pass_metrics(samples: int) -> list[tuple[str, str, str]]:
    """``(label, evaluation, metric)`` of every pass@k figure the report shows."""
    rows = []
    for split in HELDOUT_SPLITS:
        rows.append((f"pass@1 greedy, {SHORT[split]}", "greedy", f"pass@1/{split}"))
    for split in HELDOUT_SPLITS:
        rows.append((f"pass@{samples} sampled, {SHORT[split]}", "sampled", f"pass@{samples}/{split}"))
    for split in HELDOUT_SPLITS:
        rows.append((f"greedy right up to literals, {SHORT[split]}", "greedy", f"skeleton@1/{split}"))
    return rows


def _evaluation(seed_runs: dict[str, Any], run: str, evaluation: str) -> dict[str, Any]:
    """One evaluation's figures of one run of one seed (empty where it is missing)."""
    return seed_runs.get(run, {}).get("eval", {}).get(evaluation, {})


def _figure(seed_runs: dict[str, Any], run: str, evaluation: str, metric: str) -> Any:
    """One evaluation figure of one run of one seed, or ``None`` where it is missing."""
    return _evaluation(seed_runs, run, evaluation).get(metric)


def seed_values(results: dict[str, Any], run: str, evaluation: str, metric: str) -> list[float]:
    """One figure of one run, per seed (seeds where the run is missing are skipped)."""
    values = []
    for seed_runs in results["runs"].values():
        found = _figure(seed_runs, run, evaluation, metric)
        if found is not None:
            values.append(float(found))
    return values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean (``n - 1`` degrees of freedom); NaNs for fewer than two values."""
    from scipy.stats import t

    if len(values) < 2:
        return math.nan, math.nan
    mean, std = mean_std(values)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    mean = round(mean, digits) + 0.0  # no "-0.000" for a difference that rounds to zero
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def paired_differences(
    results: dict[str, Any], first: str, second: str, evaluation: str, metric: str
) -> list:
    """``first - second`` per seed where both ran."""
    diffs = []
    for seed_runs in results["runs"].values():
        a = _figure(seed_runs, first, evaluation, metric)
        b = _figure(seed_runs, second, evaluation, metric)
        if a is not None and b is not None:
            diffs.append(float(a) - float(b))
    return diffs


def discordant_problems(results: dict[str, Any], first: str, second: str, split: str) -> tuple[int, int]:
    """Held-out problems of ``split`` that only ``first``'s greedy completion solves, and only
    ``second``'s, summed over the seeds where both ran (from ``solved/<split>``)."""
    first_only = second_only = 0
    for seed_runs in results["runs"].values():
        a = _figure(seed_runs, first, "greedy", f"solved/{split}")
        b = _figure(seed_runs, second, "greedy", f"solved/{split}")
        if a is not None and b is not None:
            first_only += len(set(a) - set(b))
            second_only += len(set(b) - set(a))
    return first_only, second_only


def sign_test(first_only: int, second_only: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of discordant problems: the probability, if each
    discordant problem were equally likely to go either way, of a split at least this uneven."""
    n = first_only + second_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first_only, second_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _per_problem_table(results: dict[str, Any], pairs: list[tuple[str, str]]) -> list[str]:
    lines = [
        "",
        "Per problem (greedy pass@1, summed over seeds): held-out problems that only the first recipe "
        "solves / only the second, and the exact two-sided sign test of those problems (McNemar). It says "
        "how surely these trained models differ on these problems; the spread over seeds (above) is the "
        "test of the recipes.",
        "",
        "| difference | " + " | ".join(SHORT[split] for split in HELDOUT_SPLITS) + " |",
        "|---" * (len(HELDOUT_SPLITS) + 1) + "|",
    ]
    for a, b in pairs:
        cells = []
        for split in HELDOUT_SPLITS:
            first_only, second_only = discordant_problems(results, a, b, split)
            p_value = sign_test(first_only, second_only)
            shown = "p < 0.0001" if p_value < 5e-5 else f"p = {p_value:.4f}"
            cells.append(f"{first_only} / {second_only} ({shown})")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def _stage(results: dict[str, Any], run: str, stage: str, key: str) -> list[float]:
    return [
        float(seed_runs[run]["train"][stage][key])
        for seed_runs in results["runs"].values()
        if run in seed_runs and stage in seed_runs[run]["train"]
    ]


def _greedy_keys(seed_runs: dict[str, Any]) -> set[str]:
    return {key for run in seed_runs for key in _evaluation(seed_runs, run, "greedy")}


def _walls(results: dict[str, Any], run: str, key: str) -> list[float]:
    return [
        float(seed_runs[run][key]) for seed_runs in results["runs"].values() if key in seed_runs.get(run, {})
    ]


def base_batch_size(protocol: dict[str, Any]) -> int:
    """The base model's pre-training batch (results written before it had its own: the recipes')."""
    return protocol.get("pretrain_micro_batch_size", protocol["micro_batch_size"])


def markdown(results: dict[str, Any]) -> str:
    """The report's tables."""
    protocol = results["protocol"]
    rows = pass_metrics(protocol["samples"])
    n = len(results["seeds"])
    recipes = results["recipes"]
    lines = [
        f"Seeds: {n} ({', '.join(map(str, results['seeds']))}); mean ± sample std over seeds. "
        f"Preset `{protocol['preset']}`; stage-2 budget {protocol['finetune_tokens']:,} "
        f"tokens per recipe at batch {protocol['micro_batch_size']}; base model "
        f"{protocol['pretrain_tokens']:,} tokens at batch {base_batch_size(protocol)}.",
        "",
        "| run | " + " | ".join(label for label, _, _ in rows) + " | stage-2 tokens | train time (s) |",
        "|---" * (len(rows) + 3) + "|",
    ]
    for run in ["base", *recipes]:
        stage = "stage2"
        cells = [_fmt(seed_values(results, run, ev, metric)) for _, ev, metric in rows]
        tokens = _stage(results, run, stage, "tokens")
        name = "base (plain MTP on pretrain, no fine-tuning)" if run == "base" else run
        token_cell = f"{np.mean(tokens):,.0f}" if tokens and run != "base" else "–"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {token_cell} | {_fmt(_walls(results, run, 'train_wall_s'), 0)} |"
        )
    pairs = [(a, b) for a, b in PAIRS if a in recipes and b in recipes]
    if pairs:
        lines += [
            "",
            "Paired differences (same seed, same base model and evaluation problems): mean ± std over seeds, "
            "the per-seed values and the 95% t-interval of the mean (n − 1 degrees of freedom).",
            "",
            "| difference | " + " | ".join(label for label, _, _ in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for a, b in pairs:
            cells = []
            for _, ev, metric in rows:
                diffs = paired_differences(results, a, b, ev, metric)
                per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
                low, high = confidence_interval(diffs)
                interval = f"; 95% CI {low:+.3f} to {high:+.3f}"
                cells.append(f"{_fmt(diffs)} ({per_seed}{interval})" if len(diffs) > 1 else _fmt(diffs))
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        if any(key.startswith("solved/") for r in results["runs"].values() for key in _greedy_keys(r)):
            lines += _per_problem_table(results, pairs)
    critic_runs = [
        (name, label)
        for name, label in (("critic", "after stage 1 (frozen base trunk)"), ("verifiable", "after stage 2"))
        if any(name in r for r in results["runs"].values())
    ]
    if critic_runs:
        keys = (
            ("auc_last_value", "AUC (V at last token)"),
            ("explained_variance", "explained var."),
            ("explained_variance_ceiling", "ceiling"),
            ("mean_weight_correct", "mean w, correct tokens"),
            ("mean_weight_incorrect", "mean w, incorrect tokens"),
            ("mean_weight_mutated_token", "mean w, mutated token"),
        )
        lines += [
            "",
            "The critic of `verifiable` on the held-out records of both splits (TD weights with the recipe's "
            "`[td]` options):",
            "",
            "| critic | " + " | ".join(label for _, label in keys) + " | EV / ceiling |",
            "|---" * (len(keys) + 2) + "|",
        ]
        for name, label in critic_runs:
            cells = [_fmt(seed_values(results, name, "critic", key)) for key, _ in keys]
            ratio = [
                ev / ceiling
                for ev, ceiling in zip(
                    seed_values(results, name, "critic", "explained_variance"),
                    seed_values(results, name, "critic", "explained_variance_ceiling"),
                )
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(ratio)} |")
        lines += _critic_by_variant_table(results, critic_runs)
    lines += ["", timing(results)]
    return "\n".join(lines) + "\n"


def _critic_by_variant_table(results: dict[str, Any], critic_runs: list[tuple[str, str]]) -> list[str]:
    """The critics' last-token AUC of each mutation kind's incorrect records against all correct ones
    (none for results written before the critic report had them)."""
    variants = sorted(
        {
            key.removeprefix(AUC_BY_VARIANT)
            for seed_runs in results["runs"].values()
            for name, _ in critic_runs
            for key in _evaluation(seed_runs, name, "critic")
            if key.startswith(AUC_BY_VARIANT)
        }
    )
    if not variants:
        return []
    lines = [
        "",
        "Which mistakes the critic sees: the last-token AUC of each variant's incorrect records against all "
        "correct records:",
        "",
        "| critic | " + " | ".join(f"`{variant}`" for variant in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for name, label in critic_runs:
        values = [seed_values(results, name, "critic", AUC_BY_VARIANT + variant) for variant in variants]
        if any(values):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def timing(results: dict[str, Any]) -> str:
    """Where the wall-clock time went (per seed means) and the machine's load."""
    parts = [f"base pre-training {_fmt(_walls(results, 'base', 'train_wall_s'), 0)} s"]
    if any("critic" in r for r in results["runs"].values()):
        critic_tokens = _stage(results, "critic", "stage1", "tokens")
        parts.append(
            f"critic stage 1 {_fmt(_walls(results, 'critic', 'train_wall_s'), 0)} s "
            f"({np.mean(critic_tokens):,.0f} tokens, reported apart from the stage-2 budget)"
        )
    evals = [
        w for run in ("base", "critic", *results["recipes"]) for w in _walls(results, run, "eval_wall_s")
    ]
    parts.append(f"evaluation {np.sum(evals):,.0f} s in all")
    trainings = [
        w for run in ("base", "critic", *results["recipes"]) for w in _walls(results, run, "train_wall_s")
    ]
    load = results["load_average"]
    return (
        f"Phases (trainings and evaluations) {(np.sum(trainings) + np.sum(evals)) / 60:.1f} min summed, "
        f"{results.get('jobs', 1)} at a time, {results['threads']} torch thread(s) per process; this "
        f"invocation {results['wall_s'] / 60:.1f} min wall clock (phases finished before it were skipped); "
        + "; ".join(parts)
        + f". Load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the end."
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """pass@1 (greedy) per run and split with std error bars; base pre-training and stage-2 curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ["base", *results["recipes"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    width = 0.8 / len(HELDOUT_SPLITS)
    for i, split in enumerate(HELDOUT_SPLITS):
        stats = [mean_std(seed_values(results, run, "greedy", f"pass@1/{split}")) for run in runs]
        x = np.arange(len(runs)) + (i - (len(HELDOUT_SPLITS) - 1) / 2) * width
        axes[0].bar(
            x, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=SHORT[split]
        )
    axes[0].set_xticks(np.arange(len(runs)), runs, rotation=20)
    axes[0].set_ylabel("held-out pass@1 (greedy)")
    axes[0].set_title(f"mean ± std over {len(results['seeds'])} seed(s)")
    axes[0].legend()
    for seed, seed_runs in results["runs"].items():
        curve = seed_runs["base"]["train"]["stage2"]["curve"]
        axes[1].plot([t for t, _ in curve], [v for _, v in curve], label=seed)
    axes[1].set_title("base model: plain MTP on the pretrain split")
    for recipe in results["recipes"]:
        for j, seed_runs in enumerate(results["runs"].values()):
            curve = seed_runs.get(recipe, {}).get("train", {}).get("stage2", {}).get("curve", [])
            axes[2].plot(
                [t for t, _ in curve],
                [v for _, v in curve],
                color=f"C{results['recipes'].index(recipe)}",
                alpha=0.8,
                label=recipe if j == 0 else None,
            )
    axes[2].set_title("stage 2 from the base (train split)")
    for ax in axes[1:]:
        ax.set_xlabel("tokens")
        ax.set_ylabel("CE of head 1 (weighted as the recipe trains)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], markdown_path: Path, png_path: Path) -> None:
    """Write ``report.md`` (tables, a link to the PNG) and the PNG."""
    plot(results, png_path)
    markdown_path.write_text(markdown(results) + f"\n![pass@1 and training curves]({png_path.name})\n")
