"""Compare training runs: evaluate each run's final export and write one markdown table plus a PNG of the
training curves read from each run's MLflow store.

``python -m wmtp_train.eval.compare RUN_DIR... --out report.md [--limit P] [--max-new-tokens M]``

Per run (a trainer ``out_dir``): the final model is ``RUN/export`` (the trainer's consolidated export);
HumanEval pass@1 comes from greedy decoding (self-speculative, which gives the same completions and
also measures accepted tokens per forward) split into the problems whose solutions are in the default
training data (``train``) and the others (``heldout``); the critic columns come from
:func:`wmtp_train.eval.critic.critic_report` on ``--critic-data`` (default: the default data's held-out
split), with each run's own TD options and ``max_len`` (from its ``config.toml``). Training curves come
from the MLflow run named in ``RUN/mlflow_run_id`` in the store the trainer used
(``sqlite:///RUN/mlflow.db`` unless ``MLFLOW_TRACKING_URI``), or from ``RUN/metrics.jsonl`` when the run
has no MLflow id.

Outputs: ``report.md``, ``report.png`` beside it, and each run's evaluation files in
``<report stem>_eval/<run name>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wmtp_train.eval.critic import CriticOptions, critic_options, critic_report
from wmtp_train.eval.humaneval import HumanEvalOptions, evaluate_humaneval
from wmtp_train.eval.loading import load_for_evaluation

log = logging.getLogger(__name__)

DEFAULT_CURVES = ("mtp_loss", "ce_head1", "value_loss", "explained_variance")


@dataclass
class RunSummary:
    """What the report shows of one run."""

    name: str
    """Run directory name."""
    recipe: str
    """Recipe from the run's params (``?`` when unknown)."""
    steps: int
    """Last logged training step."""
    final: dict[str, float]
    """Last logged value of each curve metric."""
    curves: dict[str, list[tuple[int, float]]]
    """``metric -> [(step, value)]``."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """HumanEval and critic metrics (critic ones prefixed ``critic/``)."""


def read_training_curves(run_dir: str | os.PathLike, metrics: Sequence[str]) -> tuple[str, dict]:
    """The recipe and the logged history of ``metrics`` of a training run.

    Args:
        run_dir: the trainer's out_dir.
        metrics: metric names to read (missing ones are skipped).

    Returns:
        ``(recipe, {metric: [(step, value), ...]})`` sorted by step.
    """
    run_dir = Path(run_dir)
    id_file = run_dir / "mlflow_run_id"
    if id_file.is_file() and id_file.read_text().strip():
        from mlflow.tracking import MlflowClient

        from wmtp_train.train.tracking import default_tracking_uri

        client = MlflowClient(tracking_uri=default_tracking_uri(run_dir))
        run_id = id_file.read_text().strip()
        recipe = client.get_run(run_id).data.params.get("recipe", "?")
        curves = {}
        for name in metrics:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            if history:
                curves[name] = history
        return recipe, curves
    return _curves_from_jsonl(run_dir, metrics)


def _curves_from_jsonl(run_dir: Path, metrics: Sequence[str]) -> tuple[str, dict]:
    from wmtp_train.train.tracking import METRICS_FILE

    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: neither mlflow_run_id nor {METRICS_FILE}")
    recipe, curves = "?", {name: [] for name in metrics}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "params" in record:
            recipe = record["params"].get("recipe", recipe)
        elif "step" in record:
            for name in metrics:
                if record.get(name) is not None:
                    curves[name].append((int(record["step"]), float(record[name])))
    return recipe, {k: sorted(v) for k, v in curves.items() if v}


def summarize_run(
    run_dir: str | os.PathLike,
    out_dir: Path,
    humaneval: HumanEvalOptions | None,
    critic: CriticOptions | None,
    critic_data: str | os.PathLike | None,
    curve_metrics: Sequence[str] = DEFAULT_CURVES,
    device: str = "cpu",
) -> RunSummary:
    """Read a run's curves and evaluate its final export.

    Args:
        run_dir: the trainer's out_dir (with ``export/``).
        out_dir: where this run's evaluation files go.
        humaneval: HumanEval options, or None to skip.
        critic: critic options, or None to skip.
        critic_data: labelled JSONL for the critic report.
        curve_metrics: training metrics to read.
        device: evaluation device.

    Returns:
        The summary.
    """
    run_dir = Path(run_dir)
    recipe, curves = read_training_curves(run_dir, curve_metrics)
    steps = max((history[-1][0] for history in curves.values()), default=0)
    summary = RunSummary(run_dir.name, recipe, steps, {k: v[-1][1] for k, v in curves.items()}, curves)
    model, tokenizer, _ = load_for_evaluation(run_dir, device=device)
    if humaneval is not None:
        summary.evaluation.update(evaluate_humaneval(model, tokenizer, humaneval, out_dir))
    if critic is not None:
        report = critic_report(model, tokenizer, critic_data, critic, out_dir)
        summary.evaluation.update({f"critic/{k}": v for k, v in report.items()})
    return summary


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


# (header, where the value comes from, key)
_COLUMNS = (
    ("run", "name", None),
    ("recipe", "recipe", None),
    ("steps", "steps", None),
    ("final MTP loss", "final", "mtp_loss"),
    ("final CE head 1", "final", "ce_head1"),
    ("pass@1 train problems", "evaluation", "pass@1/train"),
    ("pass@1 held-out problems", "evaluation", "pass@1/heldout"),
    ("pass@1 all", "evaluation", "pass@1"),
    ("tokens / forward (MTP self-spec.)", "evaluation", "tokens_per_forward"),
    ("critic AUC (V last)", "evaluation", "critic/auc_last_value"),
    ("critic explained var.", "evaluation", "critic/explained_variance"),
    ("explained var. ceiling", "evaluation", "critic/explained_variance_ceiling"),
    ("mean w (correct)", "evaluation", "critic/mean_weight_correct"),
    ("mean w (incorrect)", "evaluation", "critic/mean_weight_incorrect"),
)


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """One row per run; columns without any value are left out.

    Args:
        summaries: the runs.

    Returns:
        A GitHub-flavoured markdown table.
    """

    def value(summary: RunSummary, source: str, key: str | None):
        raw = getattr(summary, source)
        return raw if key is None else raw.get(key)

    columns = [c for c in _COLUMNS if any(value(s, c[1], c[2]) is not None for s in summaries)]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = [v if isinstance(v := value(s, src, key), str) else _cell(v) for _, src, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(summaries: Sequence[RunSummary], path: str | os.PathLike) -> list[str]:
    """One panel per metric logged by at least one run, one line per run.

    Args:
        summaries: the runs.
        path: the PNG to write.

    Returns:
        The metrics plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in dict.fromkeys(k for s in summaries for k in s.curves)]
    n = max(len(metrics), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # one colour per run in every panel
    for ax, metric in zip(axes[0], metrics):
        for i, s in enumerate(summaries):
            if metric in s.curves:
                steps, values = zip(*s.curves[metric])
                label = f"{s.name} ({s.recipe})"
                ax.plot(steps, values, label=label, color=colors[i % len(colors)], linewidth=1.2)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if metrics:
        axes[0][0].legend(fontsize=8)
    else:
        axes[0][0].text(0.5, 0.5, "no training curves found", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return metrics


def write_report(summaries: Sequence[RunSummary], out: str | os.PathLike, settings: str) -> tuple[Path, Path]:
    """Write ``out`` (markdown) and the PNG beside it.

    Args:
        summaries: the runs.
        out: the markdown path.
        settings: one paragraph describing how the numbers were obtained.

    Returns:
        ``(markdown path, png path)``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_curves(summaries, png)
    text = (
        f"# Run comparison\n\n{settings}\n\n{markdown_table(summaries)}\n\n![training curves]({png.name})\n"
    )
    out.write_text(text)
    return out, png


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m wmtp_train.eval.compare``."""
    p = argparse.ArgumentParser(
        prog="python -m wmtp_train.eval.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("runs", nargs="+", help="training run directories (trainer out_dir, with export/)")
    p.add_argument("--out", default="report.md", help="markdown report path (the PNG goes beside it)")
    p.add_argument("--limit", type=int, default=None, help="first N HumanEval problems only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-humaneval", action="store_true")
    p.add_argument("--critic-data", default=None, help="labelled JSONL (default: default data's held-out)")
    p.add_argument("--no-critic", action="store_true")
    p.add_argument("--critic-limit", type=int, default=None, help="first N critic records only")
    p.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="comma-separated training metrics")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wmtp_train.eval.compare``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    humaneval = None
    if not args.no_humaneval:
        humaneval = HumanEvalOptions(
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            batch_size=args.batch_size,
            speculative=True,
            workers=args.workers,
        )
    critic_data = args.critic_data
    if not args.no_critic and critic_data is None:
        from wmtp_train.data.humaneval import ensure_default_dataset

        critic_data = ensure_default_dataset().heldout_path
    out = Path(args.out)
    eval_root = out.parent / f"{out.stem}_eval"
    curves = [c for c in args.curves.split(",") if c]
    names = [Path(r).name for r in args.runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: directory names must differ (they label the rows), got {names}")
    summaries = []
    for run in args.runs:
        log.info("evaluating %s", run)
        critic = None if args.no_critic else critic_options(run, limit=args.critic_limit)
        summaries.append(
            summarize_run(
                run, eval_root / Path(run).name, humaneval, critic, critic_data, curves, args.device
            )
        )
    settings = []
    if humaneval is not None:
        settings.append(
            f"HumanEval: {summaries[0].evaluation['n_problems']} problems, greedy, at most "
            f"{args.max_new_tokens} new tokens, pass@1 scored in the sandbox. Train problems are those "
            "whose canonical solution and mutants are in the default training data."
        )
    if not args.no_critic:
        settings.append(
            f"Critic: {summaries[0].evaluation['critic/n_records']} records of {critic_data}, TD weights "
            "with each run's own [td] options and data.max_len (its config.toml)."
        )
    settings.append("Curves from each run's MLflow store.")
    md, png = write_report(summaries, out, " ".join(settings))
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
