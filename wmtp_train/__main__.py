"""Command line: ``python -m wmtp_train`` (one process) or ``torchrun --nproc_per_node=N -m wmtp_train``.

Examples::

    python -m wmtp_train --recipe verifiable --preset micro --out runs/v --max-steps 20
    torchrun --standalone --nproc_per_node=2 -m wmtp_train --recipe verifiable --preset micro --out runs/v
    python -m wmtp_train --recipe baseline --set stage2.lr=3e-4 --set data.max_len=256 --print-config
    python -m wmtp_train --recipe verifiable --out runs/v --resume          # latest good checkpoint
    python -m wmtp_train --recipe verifiable --preset 7b_1t_4 --estimate-memory --world-size 8 \
        --set data.max_len=2048 --set parallel.activation_checkpoint=full  # per-rank peak, no GPU needed
"""

from __future__ import annotations

import argparse
import sys

from wmtp_train.config import RECIPES, TrainConfig
from wmtp_train.config_files import load_recipe


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="python -m wmtp_train", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="verifiable", help=f"one of {RECIPES} or a path to a .toml file")
    parser.add_argument("--preset", help="model preset (model.preset)")
    parser.add_argument("--out", help="run directory (run.out_dir)")
    parser.add_argument("--max-steps", type=int, help="stop after N optimizer steps in total (run.max_steps)")
    parser.add_argument("--data", help="training JSONL file (data.path); default: the HumanEval-verified set")
    parser.add_argument(
        "--checkpoint-dir", help="start from a Meta checkpoint directory (model.checkpoint_dir)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from a checkpoint or run directory; without a value, the latest complete checkpoint "
        "under --out",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field (repeatable)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="debug mode: the loss checks hidden states and values for NaN/Inf (numerics.check_finite)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print every stage's per-rank peak memory for --world-size ranks, simulated on fake tensors "
        "(no GPU needed; run.device auto means a CUDA run), and exit",
    )
    parser.add_argument("--world-size", type=int, help="ranks of the run that --estimate-memory estimates")
    parser.add_argument(
        "--measure-memory",
        action="store_true",
        help="run --estimate-memory's steps on real tensors (under torchrun) and print the allocator's peak "
        "next to the estimate, and exit",
    )
    return parser


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe plus the flags (flags are applied after ``--set``).

    Args:
        args: parsed arguments.

    Returns:
        The validated config.
    """
    overrides = list(args.overrides)
    for flag, key in (
        ("preset", "model.preset"),
        ("out", "run.out_dir"),
        ("max_steps", "run.max_steps"),
        ("data", "data.path"),
        ("checkpoint_dir", "model.checkpoint_dir"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.debug:
        overrides.append("numerics.check_finite=true")
    return load_recipe(args.recipe, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
    except (ValueError, TypeError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    if args.estimate_memory or args.measure_memory:
        return _memory_report(config, args)
    import torch.distributed as dist

    from wmtp_train.train.trainer import NonFiniteAbort, train

    try:
        train(config, resume=args.resume)
    except NonFiniteAbort as exc:
        print(f"aborted: {exc}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _memory_report(config: TrainConfig, args: argparse.Namespace) -> int:
    """``--estimate-memory`` (fake tensors, ``--world-size`` ranks) or ``--measure-memory`` (this job)."""
    import torch.distributed as dist

    from wmtp_train.train import memory
    from wmtp_train.train.parallelize import init_distributed

    if args.estimate_memory == args.measure_memory:
        print("config error: give one of --estimate-memory and --measure-memory", file=sys.stderr)
        return 2
    if args.estimate_memory and (args.world_size is None or args.world_size < 1):
        print("config error: --estimate-memory needs --world-size N (N >= 1)", file=sys.stderr)
        return 2
    device = "cpu" if config.run.device == "cpu" else "cuda"
    try:
        memory.estimation_config(config, device)  # what cannot be estimated, before any work
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.estimate_memory:
        peaks = memory.estimate_memory(config, args.world_size, device)
        print(memory.format_report(peaks, config, args.world_size, device))
        return 0
    info = init_distributed(config.run.device)
    try:
        peaks = memory.measure_memory(config, info)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    if info.is_main:
        print(memory.format_report(peaks, config, info.world_size, info.device.type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
