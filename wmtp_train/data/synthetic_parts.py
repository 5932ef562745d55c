"""The parts that synthetic code tasks are composed of: typed one-step transformations with code and a clause.

A *part* maps a value of one type (``list`` of ints, ``int`` or ``str``) to a value of another type
(``list``, ``int``, ``str`` or ``bool``). It carries the code of the step (a format string over the input
variable ``{i}``, the output variable ``{o}`` and its constant slots such as ``{k}``), the step's clause
for the docstring, and the domain of each constant slot. A task chains one to three parts; its canonical
solution is one statement per one-line part (three lines for a loop part) and ``return``.

Each slot's domain has *training values* and *held-out values*: a deterministic quarter of the range plus
an extension above the range that no training problem uses. Function names, docstring frames and
connectives likewise have reserved variants that only held-out problems use
(see :mod:`wmtp_train.data.synthetic`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

TYPES = ("list", "int", "str", "bool")
TYPE_HINTS = {"list": "list[int]", "int": "int", "str": "str", "bool": "bool"}
CATEGORIES = ("list", "condition", "aggregate", "loop", "arithmetic", "string")
LETTERS = tuple("abcdeilmnorst")
SUFFIXES = ("ab", "xy", "ing", "ed", "er", "s", "zz", "ok", "end", "no", "up", "qq", "ion")


@dataclass(frozen=True)
class Slot:
    """A constant of a part.

    Attributes:
        name: the placeholder in the part's code and wordings (e.g. ``"k"``).
        values: the slot's range (training values and the interior held-out values).
        extension: values above the range; only held-out problems use them.
    """

    name: str
    values: tuple
    extension: tuple = ()


@dataclass(frozen=True)
class Part:
    """One typed step.

    Attributes:
        name: unique identifier (used in template names, e.g. ``l_gt+a_sum``).
        category: one of :data:`CATEGORIES`.
        in_type, out_type: types of :data:`TYPES` (``bool`` only as an output: such parts end a chain).
        code: format string of the step's lines (``{i}`` input variable, ``{o}`` output variable, slots).
        wording: the step's docstring clause, a format string over the slots.
        slots: the constants.
    """

    name: str
    category: str
    in_type: str
    out_type: str
    code: str
    wording: str
    slots: tuple[Slot, ...] = ()

    @property
    def is_loop(self) -> bool:
        """Whether the step is a multi-line loop (at most one per task keeps solutions within 6 lines)."""
        return "\n" in self.code


def _ints(lo: int, hi: int, extra: int) -> dict:
    return {"values": tuple(range(lo, hi + 1)), "extension": tuple(range(hi + 1, hi + 1 + extra))}


def _k(lo: int, hi: int, extra: int) -> tuple[Slot, ...]:
    return (Slot("k", **_ints(lo, hi, extra)),)


_LETTER = (Slot("a", LETTERS, ("u", "p")),)
_L, _I, _S = "list", "int", "str"

PARTS: tuple[Part, ...] = (
    # list -> list
    Part("l_add", "list", _L, _L, "{o} = [x + {k} for x in {i}]", "add {k} to every number", _k(1, 9, 3)),
    Part("l_mul", "list", _L, _L, "{o} = [x * {k} for x in {i}]", "multiply every number by {k}",
         _k(2, 9, 2)),
    Part("l_gt", "list", _L, _L, "{o} = [x for x in {i} if x > {k}]", "keep the numbers greater than {k}",
         _k(0, 9, 3)),
    Part("l_even", "list", _L, _L, "{o} = [x for x in {i} if x % 2 == 0]", "keep the even numbers"),
    Part("l_sort", "list", _L, _L, "{o} = sorted({i})", "sort the numbers"),
    Part("l_reverse", "list", _L, _L, "{o} = {i}[::-1]", "reverse the list"),
    Part("l_double_even", "condition", _L, _L, "{o} = [x * 2 if x % 2 == 0 else x for x in {i}]",
         "double the even numbers, keep the odd ones"),
    # list -> int
    Part("a_sum", "aggregate", _L, _I, "{o} = sum({i})", "take the sum"),
    Part("a_max", "aggregate", _L, _I, "{o} = max({i}, default=0)", "take the maximum (0 if empty)"),
    Part("a_len", "aggregate", _L, _I, "{o} = len({i})", "count the numbers"),
    Part("a_product", "loop", _L, _I, "{o} = 1\nfor x in {i}:\n    {o} *= x",
         "take the product (1 if empty)"),
    # int -> int
    Part("i_add", "arithmetic", _I, _I, "{o} = {i} + {k}", "add {k}", _k(1, 20, 5)),
    Part("i_mul", "arithmetic", _I, _I, "{o} = {i} * {k}", "multiply by {k}", _k(2, 9, 2)),
    Part("i_mod", "arithmetic", _I, _I, "{o} = {i} % {k}", "take the remainder modulo {k}", _k(2, 9, 2)),
    Part("i_halve_or_add", "condition", _I, _I, "{o} = {i} // 2 if {i} % 2 == 0 else {i} + {k}",
         "halve it if even, else add {k}", _k(1, 9, 3)),
    Part("i_digit_sum", "loop", _I, _I, "{o} = 0\nfor d in str(abs({i})):\n    {o} += int(d)",
         "take the sum of its digits"),
    Part("i_to_str", "string", _I, _S, "{o} = str({i})", "convert it to a string"),
    Part("b_gt", "condition", _I, "bool", "{o} = {i} > {k}", "check whether it is greater than {k}",
         _k(0, 30, 8)),
    # str -> str
    Part("s_upper", "string", _S, _S, "{o} = {i}.upper()", "convert it to upper case"),
    Part("s_reverse", "string", _S, _S, "{o} = {i}[::-1]", "reverse the string"),
    Part("s_repeat", "string", _S, _S, "{o} = {i} * {k}", "repeat it {k} times", _k(2, 4, 1)),
    Part("s_append", "string", _S, _S, "{o} = {i} + '{w}'", "append '{w}'",
         (Slot("w", SUFFIXES[:-2], SUFFIXES[-2:]),)),
    Part("s_double_chars", "loop", _S, _S, "{o} = ''\nfor c in {i}:\n    {o} += c * 2",
         "double every character"),
    # str -> int
    Part("s_len", "aggregate", _S, _I, "{o} = len({i})", "take the length"),
    Part("s_count", "aggregate", _S, _I, "{o} = {i}.count('{a}')", "count the '{a}' characters", _LETTER),
)  # fmt: skip
PARTS_BY_NAME = {part.name: part for part in PARTS}

# Variable names per type: (name, alternate name for a loop whose output has the input's type).
VARIABLE_NAMES = {
    "list": (("xs", "ys"), ("nums", "vals")),
    "int": (("n", "m"), ("num", "total")),
    "str": (("s", "t"), ("text", "out")),
    "bool": (("ok", "ok"), ("flag", "flag")),
}
FUNCTION_NAMES = ("solve", "compute", "transform", "process", "calculate", "apply_steps", "run", "handle")
# Docstring: frame + clauses joined by a connective + ending.
FRAMES = ("Given {v}, ", "Starting from {v}, ", "Take {v} and ")
CONNECTIVES = (", then ", "; next, ", ", and after that ")
ENDING = "."
#: How many of the leading variants of each surface pool training problems draw from; the rest are reserved.
SEEN_VARIANTS = {"functions": 6, "frames": 2, "connectives": 2}


def check_catalogue() -> None:
    """Raise ``ValueError`` if a part is malformed (duplicate name, bad type or category, unknown slot)."""
    if len(PARTS_BY_NAME) != len(PARTS):
        raise ValueError("PARTS: duplicate part names")
    for part in PARTS:
        if part.category not in CATEGORIES or part.in_type not in TYPES[:3] or part.out_type not in TYPES:
            raise ValueError(f"part {part.name}: bad category or types")
        names = {slot.name for slot in part.slots}
        probe = dict.fromkeys(names, "0")
        part.code.format(i="v", o="v", **probe)
        part.wording.format(**probe)
        if any(f"{{{name}}}" not in part.code for name in names):
            raise ValueError(f"part {part.name}: a slot is missing from the code")


def heldout_values(slot: Slot, part: str, seed: int) -> tuple:
    """The values of a slot that only held-out problems use: a hashed quarter of the range + the extension.

    Args:
        slot: the slot.
        part: the part's name (the same value can be held out for one part and not for another).
        seed: the build seed.

    Returns:
        The held-out values (at least one).
    """
    interior = tuple(
        v
        for v in slot.values
        if hashlib.sha256(f"{seed}:{part}:{slot.name}:{v}".encode()).digest()[0] % 4 == 0
    )
    return interior + slot.extension


def training_values(slot: Slot, part: str, seed: int) -> tuple:
    """The values of a slot that training problems use (the range minus :func:`heldout_values`).

    Args:
        slot: the slot.
        part: the part's name.
        seed: the build seed.

    Returns:
        The training values.
    """
    held = set(heldout_values(slot, part, seed))
    return tuple(v for v in slot.values if v not in held)
