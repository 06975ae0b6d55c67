"""The shape guards of an exported program as data, and the module that checks them.

torch.export checks its inputs with generated code (`_guards_fn`): the sizes a dimension may
have (ranges, sizes fixed by the trace, dimensions that must be equal) and the conditions the
trace observed (`L['input_ids'].size()[1] <= 512`). `guards_of(program, names)` lists the same
checks as `[comparison, term, term]` values, or None where one is not a comparison of input
sizes. `ShapeGuards` checks them: it replaces torch's generated `_guards_fn` in every exported
capture (fresh or read from the persistent capture cache), so that inputs breaking a guard get
one error for people (`InputShapeError`: which sizes, which rule, what to do) either way.
"""

from __future__ import annotations

import ast
import math
import operator

import torch
from torch import nn

from tdhook_fx.errors import InputShapeError, StoredGraphInvalid

COMPARISONS = {"<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne, ">=": operator.ge, ">": operator.gt}
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}
GUARDS_MODULE = "_guards_fn"  # the name of torch.export's shape-guard module in its graphs
MAX_GUARDS = 4096
MAX_TERM_DEPTH = 16

_COMPARISONS = {ast.LtE: "<=", ast.Lt: "<", ast.Eq: "==", ast.NotEq: "!=", ast.GtE: ">=", ast.Gt: ">"}
_ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}


def install(graph_module: torch.fx.GraphModule, guards: list | None) -> None:
    """Check `guards` with `ShapeGuards` in place of torch's generated `_guards_fn` (kept where
    they are not known: its error is then torch's)."""
    if guards is not None and isinstance(getattr(graph_module, GUARDS_MODULE, None), nn.Module):
        names = tuple(node.name for node in graph_module.graph.nodes if node.op == "placeholder")
        setattr(graph_module, GUARDS_MODULE, ShapeGuards(guards, names))


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


class ShapeGuards(nn.Module):
    """Checks the inputs of an exported graph against its shape guards (`guards_of`'s values;
    `names`: the graph's inputs, in order), raising `InputShapeError` at the first one broken.
    Values read from a file are checked first (`checked`)."""

    _is_impure = True  # called for its check only: fx's dead-code elimination keeps it

    def __init__(self, guards: list, names: tuple[str, ...]):
        super().__init__()
        self.guards = guards
        self.names = tuple(names)

    def forward(self, *inputs):
        for comparison, left, right in self.guards:
            if not COMPARISONS[comparison](_value(left, inputs), _value(right, inputs)):
                raise InputShapeError(self._broken(comparison, left, right, inputs))

    def _broken(self, comparison, left, right, inputs) -> str:
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for name, x in zip(self.names, inputs))
        return (
            f"the inputs break a shape rule of the model's captured graph: {self._text(left)} {comparison} "
            f"{self._text(right)} (here {_value(left, inputs)} and {_value(right, inputs)}; inputs: {shapes})\n"
            "  torch.export fixed or bounded these sizes while tracing the model on the example (a size the "
            "model only accepts up to a limit, inputs whose lengths must agree)\n"
            "  hint: pass inputs that keep the rule, or compile again on an example of the shapes you will use"
        )

    def _text(self, term) -> str:
        if isinstance(term, int):
            return str(term)
        if term[0] == "size":
            return f"{self.names[term[1]]}.size({term[2]})"
        return f"({self._text(term[1])} {term[0]} {self._text(term[2])})"


def _value(term, inputs) -> int:
    if isinstance(term, int):
        return term
    if term[0] == "size":
        return inputs[term[1]].shape[term[2]]
    return ARITHMETIC[term[0]](_value(term[1], inputs), _value(term[2], inputs))


def checked(value, names: tuple[str, ...]) -> list:
    """Guards read from a file (`stored_graph`), refused (`StoredGraphInvalid`) unless each is
    `[comparison, term, term]` over sizes of the graph's `len(names)` inputs."""
    if not isinstance(value, list) or len(value) > MAX_GUARDS:
        raise StoredGraphInvalid("bad shape guards")
    for guard in value:
        if not (isinstance(guard, list) and len(guard) == 3 and guard[0] in COMPARISONS):
            raise StoredGraphInvalid("bad shape guard")
        _check_term(guard[1], len(names), 0)
        _check_term(guard[2], len(names), 0)
    return value


def _check_term(term, inputs: int, depth: int) -> None:
    if type(term) is int:
        return
    if depth < MAX_TERM_DEPTH and isinstance(term, list) and len(term) == 3:
        if term[0] == "size" and all(type(t) is int for t in term[1:]) and 0 <= term[1] < inputs and 0 <= term[2] < 64:
            return
        if term[0] in ARITHMETIC:
            _check_term(term[1], inputs, depth + 1)
            _check_term(term[2], inputs, depth + 1)
            return
    raise StoredGraphInvalid("bad shape guard term")
