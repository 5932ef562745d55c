"""Command line: ``python -m wmtp_train.experiment --recipes R1,R2,... --seeds N --out DIR [--quick]``.

Examples::

    python -m wmtp_train.experiment --out runs/exp      # baseline, correct_only, verifiable; 3 seeds
    python -m wmtp_train.experiment --recipes baseline,correct_only,verifiable,rho1_weighted \
        --seeds 3 --out runs/exp
    python -m wmtp_train.experiment --quick --out runs/exp_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from wmtp_train.experiment.driver import run_experiment
from wmtp_train.experiment.measure import add_greedy_details
from wmtp_train.experiment.protocol import DEFAULT, DEFAULT_RECIPES, QUICK, Protocol
from wmtp_train.experiment.report import write_report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m wmtp_train.experiment", description=__doc__.split("\n")[0]
    )
    recipes = ",".join(DEFAULT_RECIPES)
    parser.add_argument("--recipes", default=recipes, help=f"comma-separated (default {recipes})")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3, --quick 1)")
    parser.add_argument("--out", required=True, help="output directory (an interrupted run continues)")
    parser.add_argument("--quick", action="store_true", help="one seed, smaller budgets and evaluation sets")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite report.md/png from --out's results.json"
    )
    parser.add_argument("--data", default=None, help="build-synthetic directory (default: built in --out)")
    parser.add_argument("--preset", default=None, help="model preset (default: the protocol's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings/evaluations at a time (default 2)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a protocol field, e.g. finetune_tokens=300000 (repeatable)",
    )
    return parser


def parse_override(item: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> ``(field, value converted to the field's type)``; ``none`` for an optional field."""
    hints = typing.get_type_hints(Protocol)
    name, sep, text = item.partition("=")
    if not sep or name not in hints:
        raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(hints)}")
    kinds = typing.get_args(hints[name]) or (hints[name],)
    if text.strip().lower() == "none" and type(None) in kinds:
        return name, None
    kind = next(k for k in kinds if k is not type(None))
    try:
        return name, kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise ValueError(f"--set {item!r}: expected {kind.__name__}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or rewrite its report) for ``argv`` (default ``sys.argv[1:]``); the exit status."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        if not (out / "results.json").is_file():
            print(f"error: --report-only: no {out / 'results.json'}", file=sys.stderr)
            return 2
        results = json.loads((out / "results.json").read_text())
        add_greedy_details(results, out)
        write_report(results, out / "report.md", out / "report.png")
        return 0
    protocol = QUICK if args.quick else DEFAULT
    try:
        changes = dict(parse_override(item) for item in args.overrides)
        if args.preset:
            changes["preset"] = args.preset
        protocol = dataclasses.replace(protocol, **changes)
        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        data = Path(args.data) if args.data else None
        run_experiment(recipes, range(seeds), out, protocol, data, args.threads, args.jobs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
