"""The parts that synthetic code tasks are composed of: typed one-step transformations with code and wordings.

A *part* maps a value of one type (``list`` of ints, ``int`` or ``str``) to a value of another type
(``list``, ``int``, ``str`` or ``bool``). It carries the code of the step (a format string over the input
variable ``{i}``, the output variable ``{o}`` and its constant slots such as ``{k}``), two wordings of the
step for the docstring, and the domain of each constant slot. A task chains one to three parts; its
canonical solution is one statement per one-line part (three lines for a loop part) and ``return``.

Each slot's domain has *training values* and *held-out values*: a deterministic quarter of the range plus
an extension above the range that no training problem uses. Names and docstring frames likewise have
reserved variants that only held-out problems use (see :mod:`wmtp_train.data.synthetic`).
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
        wordings: the docstring clauses, format strings over the slots.
        slots: the constants.
    """

    name: str
    category: str
    in_type: str
    out_type: str
    code: str
    wordings: tuple[str, ...]
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
    Part("l_add", "list", _L, _L, "{o} = [x + {k} for x in {i}]",
         ("add {k} to every number", "increase each number by {k}"), _k(1, 20, 6)),
    Part("l_mul", "list", _L, _L, "{o} = [x * {k} for x in {i}]",
         ("multiply every number by {k}", "scale each number by a factor of {k}"), _k(2, 9, 3)),
    Part("l_gt", "list", _L, _L, "{o} = [x for x in {i} if x > {k}]",
         ("keep only the numbers greater than {k}", "remove every number that is at most {k}"), _k(0, 15, 5)),
    Part("l_lt", "list", _L, _L, "{o} = [x for x in {i} if x < {k}]",
         ("keep only the numbers less than {k}", "remove every number that is at least {k}"), _k(0, 15, 5)),
    Part("l_even", "list", _L, _L, "{o} = [x for x in {i} if x % 2 == 0]",
         ("keep only the even numbers", "remove the odd numbers")),
    Part("l_sort", "list", _L, _L, "{o} = sorted({i})",
         ("sort the numbers in increasing order", "arrange the numbers from smallest to largest")),
    Part("l_reverse", "list", _L, _L, "{o} = {i}[::-1]",
         ("reverse the order of the numbers", "put the numbers in reverse order")),
    Part("l_head", "list", _L, _L, "{o} = {i}[:{k}]",
         ("keep only the first {k} numbers", "cut the list after its first {k} numbers"), _k(1, 5, 2)),
    Part("l_square", "list", _L, _L, "{o} = [x * x for x in {i}]",
         ("square every number", "replace each number by its square")),
    Part("l_double_even", "condition", _L, _L, "{o} = [x * 2 if x % 2 == 0 else x for x in {i}]",
         ("double the even numbers and leave the odd ones unchanged",
          "multiply each even number by 2, keeping the odd numbers as they are")),
    # list -> int
    Part("a_sum", "aggregate", _L, _I, "{o} = sum({i})",
         ("take the sum of the numbers", "add up all the numbers")),
    Part("a_max", "aggregate", _L, _I, "{o} = max({i}, default=0)",
         ("take the largest number, or 0 if there is none", "find the maximum of the numbers (0 if empty)")),
    Part("a_len", "aggregate", _L, _I, "{o} = len({i})",
         ("count the numbers", "take how many numbers there are")),
    Part("a_count", "aggregate", _L, _I, "{o} = {i}.count({k})",
         ("count how many numbers are equal to {k}", "count the occurrences of {k}"), _k(0, 9, 4)),
    Part("a_product", "loop", _L, _I, "{o} = 1\nfor x in {i}:\n    {o} *= x",
         ("multiply all the numbers together (1 if there are none)",
          "take the product of the numbers, or 1 if there are none")),
    # int -> int
    Part("i_add", "arithmetic", _I, _I, "{o} = {i} + {k}",
         ("add {k} to the number", "increase the number by {k}"), _k(1, 30, 10)),
    Part("i_sub", "arithmetic", _I, _I, "{o} = {i} - {k}",
         ("subtract {k} from the number", "decrease the number by {k}"), _k(1, 30, 10)),
    Part("i_mul", "arithmetic", _I, _I, "{o} = {i} * {k}",
         ("multiply the number by {k}", "scale the number by a factor of {k}"), _k(2, 9, 3)),
    Part("i_div", "arithmetic", _I, _I, "{o} = {i} // {k}",
         ("divide the number by {k}, rounding down", "integer-divide the number by {k} (round down)"),
         _k(2, 9, 3)),
    Part("i_mod", "arithmetic", _I, _I, "{o} = {i} % {k}",
         ("take the remainder of the number modulo {k} (never negative)",
          "reduce the number modulo {k} (the result is not negative)"), _k(2, 9, 3)),
    Part("i_halve_or_add", "condition", _I, _I, "{o} = {i} // 2 if {i} % 2 == 0 else {i} + {k}",
         ("halve the number if it is even, otherwise add {k} to it",
          "if the number is even divide it by 2, else increase it by {k}"), _k(1, 9, 4)),
    Part("i_digit_sum", "loop", _I, _I, "{o} = 0\nfor d in str(abs({i})):\n    {o} += int(d)",
         ("replace the number by the sum of its decimal digits (ignore the sign)",
          "add up the decimal digits of the number, ignoring its sign")),
    Part("i_to_str", "string", _I, _S, "{o} = str({i})",
         ("write the number as a decimal string", "convert the number to its decimal text")),
    Part("b_gt", "condition", _I, "bool", "{o} = {i} > {k}",
         ("check whether the number is greater than {k}", "tell if the number exceeds {k}"), _k(0, 50, 15)),
    # str -> str
    Part("s_upper", "string", _S, _S, "{o} = {i}.upper()",
         ("convert the string to upper case", "make every letter uppercase")),
    Part("s_reverse", "string", _S, _S, "{o} = {i}[::-1]",
         ("reverse the string", "write the string backwards")),
    Part("s_replace", "string", _S, _S, "{o} = {i}.replace('{a}', '{b}')",
         ("replace every '{a}' with '{b}'", "change each '{a}' into '{b}'"),
         (*_LETTER, Slot("b", LETTERS, ("u", "p")))),
    Part("s_head", "string", _S, _S, "{o} = {i}[:{k}]",
         ("keep only the first {k} characters", "cut the string after {k} characters"), _k(1, 5, 2)),
    Part("s_repeat", "string", _S, _S, "{o} = {i} * {k}",
         ("repeat the string {k} times", "concatenate {k} copies of the string"), _k(2, 4, 1)),
    Part("s_append", "string", _S, _S, "{o} = {i} + '{w}'",
         ("append '{w}' to the string", "add '{w}' at the end of the string"),
         (Slot("w", SUFFIXES[:-2], SUFFIXES[-2:]),)),
    Part("s_rev_if_long", "condition", _S, _S, "{o} = {i}[::-1] if len({i}) > {k} else {i}",
         ("reverse the string if it has more than {k} characters",
          "if the string is longer than {k} characters, write it backwards"), _k(1, 6, 2)),
    Part("s_double_chars", "loop", _S, _S, "{o} = ''\nfor c in {i}:\n    {o} += c * 2",
         ("repeat every character twice", "double each character of the string")),
    # str -> int
    Part("s_len", "aggregate", _S, _I, "{o} = len({i})",
         ("take the length of the string", "count the characters of the string")),
    Part("s_count", "aggregate", _S, _I, "{o} = {i}.count('{a}')",
         ("count the occurrences of '{a}'", "count how many times '{a}' appears"), _LETTER),)  # fmt: skip
PARTS_BY_NAME = {part.name: part for part in PARTS}

# Variable names per type: (name, alternate name for a loop whose output has the input's type).
VARIABLE_NAMES = {
    "list": (("xs", "ys"), ("nums", "vals"), ("values", "items"), ("numbers", "data")),
    "int": (("n", "m"), ("num", "total"), ("value", "acc"), ("number", "amount")),
    "str": (("s", "t"), ("text", "out"), ("word", "res"), ("line", "buf")),
    "bool": (("ok", "ok"), ("flag", "flag"), ("answer", "answer"), ("result", "result")),
}
FUNCTION_NAMES = ("solve", "compute", "transform", "process", "calculate", "apply_steps", "run", "handle")
# Docstring: frame + clauses joined by a connective + ending.
FRAMES = ("Given {v}, ", "Starting from {v}, ", "Take {v} and ")
CONNECTIVES = (", then ", "; next, ", ", and after that ")
ENDING = "."
#: How many of the leading variants of each surface pool training problems draw from; the rest are reserved.
SEEN_VARIANTS = {"names": 2, "functions": 6, "frames": 2, "connectives": 2}


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
        for wording in part.wordings:
            wording.format(**probe)
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
