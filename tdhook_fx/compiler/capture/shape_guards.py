"""The shape guards of an exported program as data (see `stored_graph.ShapeGuards`).

torch.export checks its inputs with generated code (`_guards_fn`): the sizes a dimension may
have (ranges, sizes fixed by the trace, dimensions that must be equal) and the conditions the
trace observed (`L['input_ids'].size()[1] <= 512`). `guards_of(program, names)` lists the same
checks as `[comparison, term, term]` values that a stored capture can hold, or None where one
is not a comparison of input sizes (such a capture is then not stored).
"""

from __future__ import annotations

import ast
import math

import torch

_COMPARISONS = {ast.LtE: "<=", ast.Lt: "<", ast.Eq: "==", ast.NotEq: "!=", ast.GtE: ">=", ast.Gt: ">"}
_ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}


class _NotASizeGuard(Exception):
    """Internal: a guard outside the stored form."""


def guards_of(program: torch.export.ExportedProgram, names: tuple[str, ...]) -> list | None:
    """The shape checks of `program`, whose inputs are called `names` (in order)."""
    try:
        guards = _input_guards(program)
        for code in program._guards_code:
            guards.append(_comparison(ast.parse(code, mode="eval").body, names))
    except (_NotASizeGuard, SyntaxError, TypeError, KeyError):
        return None
    return guards


def _input_guards(program) -> list:
    """Each input dimension: its size where the trace fixed it, its range, or which earlier one it equals."""
    from torch.utils._sympy.numbers import int_oo

    guards, seen = [], {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    users = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"}
    for index, node in enumerate(n for n in placeholders if n.name in users):
        for dim, size in enumerate(node.meta["val"].shape):
            term = ["size", index, dim]
            if isinstance(size, int):
                guards.append(["==", term, size])
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                raise _NotASizeGuard(str(expr))
            if expr in seen:
                guards.append(["==", term, seen[expr]])
                continue
            seen[expr] = term
            bounds = program.range_constraints[expr]
            if int(bounds.lower) > 2:
                guards.append([">=", term, int(bounds.lower)])
            if bounds.upper is not int_oo and not math.isinf(float(bounds.upper)):
                guards.append(["<=", term, int(bounds.upper)])
    return guards


def _comparison(node: ast.expr, names) -> list:
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARISONS):
        raise _NotASizeGuard(ast.dump(node))
    return [_COMPARISONS[type(node.ops[0])], _term(node.left, names), _term(node.comparators[0], names)]


def _term(node: ast.expr, names):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return [_ARITHMETIC[type(node.op)], _term(node.left, names), _term(node.right, names)]
    # L['name'].size()[dim]
    if (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and type(node.slice.value) is int
        and isinstance(node.value, ast.Call) and not node.value.args and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "size" and isinstance(node.value.func.value, ast.Subscript)
        and isinstance(node.value.func.value.value, ast.Name) and node.value.func.value.value.id == "L"
        and isinstance(node.value.func.value.slice, ast.Constant) and node.value.func.value.slice.value in names
    ):
        return ["size", names.index(node.value.func.value.slice.value), node.slice.value]
    raise _NotASizeGuard(ast.dump(node))
