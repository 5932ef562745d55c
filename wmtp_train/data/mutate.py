"""AST mutants of a function body, to make plausible wrong (or accidentally still right) solutions.

A body such as a HumanEval completion is parsed inside a dummy ``def``, every mutation site is listed in
``ast.walk`` order, and one mutation is applied per mutant:

- ``operator_swap``: ``+ <-> -``, ``* <-> //``, ``/ -> *``, ``% -> //``, ``** -> *``, ``& <-> |``, ...
  (binary and augmented assignments);
- ``comparison_flip``: ``< <-> >=``, ``> <-> <=``, ``== <-> !=``, ``in <-> not in``, ``is <-> is not``;
- ``off_by_one``: ``< <-> <=``, ``> <-> >=``; ``range`` bounds and slice bounds moved by one;
- ``constant_change``: ints +1, floats +1, ``True <-> False``, strings emptied (or made ``" "``);
- ``boolean_swap``: ``and <-> or``; ``condition_negation``: ``if``/``while``/ternary tests negated;
- ``statement_deletion``: one statement removed from a block of two or more;
- ``return_change``: ``return c`` -> ``return not c`` for boolean-looking values, else ``return None``.

Sites are shuffled per kind by ``random.Random(seed)`` and taken round-robin across kinds, so mutants are
varied and deterministic. Every mutant is syntactically valid (compiled) and differs from the original
and from the other mutants after normalisation (``ast.unparse``). Bodies are returned normalised with a
4-space indent; :func:`normalize_body` gives the original in the same form, so formatting never tells
an original from a mutant.
"""

from __future__ import annotations

import ast
import copy
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

_BINOP_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_COMPARE_FLIPS = {
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_COMPARE_BOUNDARY = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_BLOCK_FIELDS = ("body", "orelse", "finalbody")
_WRAPPER = "__wmtp_mutant__"

MUTATION_KINDS = (
    "operator_swap",
    "comparison_flip",
    "off_by_one",
    "constant_change",
    "boolean_swap",
    "condition_negation",
    "statement_deletion",
    "return_change",
)


@dataclass(frozen=True)
class Mutant:
    """One mutated body.

    Attributes:
        body: the mutated function body, 4-space indented, newline-terminated.
        kind: one of :data:`MUTATION_KINDS`.
    """

    body: str
    kind: str


@dataclass(frozen=True)
class _Site:
    kind: str
    node: int  # position of the node in ast.walk order
    apply: Callable[[ast.AST], None]


def _plus_one(expr: ast.expr, op: ast.operator) -> ast.expr:
    return ast.BinOp(left=expr, op=op, right=ast.Constant(1))


def _set_op(attr: str, new_type: type) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        setattr(node, attr, new_type())

    return apply


def _set_compare_op(i: int, new_type: type) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        node.ops[i] = new_type()

    return apply


def _shift_arg(i: int, op: type) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        node.args[i] = _plus_one(node.args[i], op())

    return apply


def _shift_field(field: str, op: type) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        setattr(node, field, _plus_one(getattr(node, field), op()))

    return apply


def _set_value(value: object) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        node.value = value

    return apply


def _negate_test(node: ast.AST) -> None:
    node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)


def _delete_statement(field: str, i: int) -> Callable[[ast.AST], None]:
    def apply(node: ast.AST) -> None:
        del getattr(node, field)[i]

    return apply


def _change_return(node: ast.Return) -> None:
    value = node.value
    booleanish = isinstance(value, ast.Compare | ast.BoolOp) or (
        isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not)
    )
    if isinstance(value, ast.Constant) and isinstance(value.value, bool):
        node.value = ast.Constant(not value.value)
    elif booleanish:
        node.value = ast.UnaryOp(op=ast.Not(), operand=value)
    else:
        node.value = ast.Constant(None)


def _changed_constant(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return "" if value else " "
    return value


def _node_sites(node: ast.AST) -> list[tuple[str, Callable[[ast.AST], None]]]:
    """The mutations that apply to ``node`` itself."""
    sites = []
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
        sites.append(("operator_swap", _set_op("op", _BINOP_SWAPS[type(node.op)])))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            sites.append(("comparison_flip", _set_compare_op(i, _COMPARE_FLIPS[type(op)])))
            if type(op) in _COMPARE_BOUNDARY:
                sites.append(("off_by_one", _set_compare_op(i, _COMPARE_BOUNDARY[type(op)])))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        for i in range(min(len(node.args), 2)):
            sites.append(("off_by_one", _shift_arg(i, ast.Add if i == 0 and len(node.args) > 1 else ast.Sub)))
    elif isinstance(node, ast.Slice):
        for field in ("lower", "upper"):
            if getattr(node, field) is not None:
                sites.append(("off_by_one", _shift_field(field, ast.Add)))
    elif isinstance(node, ast.Constant) and _changed_constant(node.value) != node.value:
        sites.append(("constant_change", _set_value(_changed_constant(node.value))))
    elif isinstance(node, ast.BoolOp):
        sites.append(("boolean_swap", _set_op("op", ast.Or if isinstance(node.op, ast.And) else ast.And)))
    elif isinstance(node, ast.If | ast.While | ast.IfExp):
        sites.append(("condition_negation", _negate_test))
    elif isinstance(node, ast.Return) and node.value is not None:
        sites.append(("return_change", _change_return))
    for field in _BLOCK_FIELDS:
        block = getattr(node, field, None)
        if isinstance(block, list) and len(block) > 1:
            sites.extend(("statement_deletion", _delete_statement(field, i)) for i in range(len(block)))
    return sites


def _parse_body(body: str) -> ast.Module:
    if not body.strip():
        raise ValueError("body is empty")
    wrapped = f"def {_WRAPPER}():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    try:
        return ast.parse(wrapped)
    except SyntaxError as exc:
        raise ValueError(f"body does not parse as a function body: {exc}") from None


def _unparse_body(tree: ast.Module) -> str:
    function = tree.body[0]
    text = "\n".join(ast.unparse(statement) for statement in function.body)
    return textwrap.indent(text, "    ") + "\n"


def _fstring_internals(tree: ast.Module) -> set[int]:
    """ids of the nodes inside f-strings, which are not mutated (format specs are fragile)."""
    return {
        id(child) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for child in ast.walk(node)
    }


def normalize_body(body: str) -> str:
    """A function body round-tripped through the AST (the formatting mutants have).

    Args:
        body: a function body at any indentation.

    Returns:
        The body, 4-space indented, comments dropped, newline-terminated.
    """
    return _unparse_body(_parse_body(body))


def mutate_body(body: str, n: int, seed: int = 0) -> list[Mutant]:
    """Up to ``n`` distinct, valid single-site mutants of a function body.

    Args:
        body: a function body at any indentation (e.g. a HumanEval completion).
        n: how many mutants to return at most (fewer when the body has fewer distinct mutants).
        seed: makes the choice deterministic.

    Returns:
        The mutants, in generation order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tree = _parse_body(body)
    original = _unparse_body(tree)
    skipped = _fstring_internals(tree)
    by_kind: dict[str, list[tuple[int, Callable]]] = {}
    for position, node in enumerate(ast.walk(tree)):
        if id(node) not in skipped:
            for kind, apply in _node_sites(node):
                by_kind.setdefault(kind, []).append((position, apply))
    rng = random.Random(seed)
    queues = []
    for kind in sorted(by_kind):
        sites = by_kind[kind]
        rng.shuffle(sites)
        queues.append((kind, sites))
    rng.shuffle(queues)
    order = [
        (kind, sites[i])
        for i in range(max((len(s) for _, s in queues), default=0))
        for kind, sites in queues
        if i < len(sites)
    ]
    mutants: list[Mutant] = []
    seen = {original}
    for kind, (position, apply) in order:
        if len(mutants) == n:
            break
        candidate = copy.deepcopy(tree)
        apply(list(ast.walk(candidate))[position])
        ast.fix_missing_locations(candidate)
        try:
            text = _unparse_body(candidate)
            compile(f"def {_WRAPPER}():\n{text}", "<mutant>", "exec")
        except (SyntaxError, ValueError):
            continue
        if text not in seen:
            seen.add(text)
            mutants.append(Mutant(body=text, kind=kind))
    return mutants
