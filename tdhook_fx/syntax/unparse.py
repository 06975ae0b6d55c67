"""Canonical DSL text of an AST node: `parse(unparse(p)) == p` for every parsed program."""

from __future__ import annotations

import re
from functools import singledispatch

from tdhook_fx.syntax import ast
from tdhook_fx.errors import InvalidArgumentType

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
# Keywords the lexer prefers over a name where a path starts (`save grad ...`).
_HEAD_KEYWORDS = {"grad"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@singledispatch
def unparse(node) -> str:
    raise InvalidArgumentType(f"not an AST node: {node!r}")


@unparse.register
def _(node: ast.Program) -> str:
    return "\n".join(unparse(s) for s in node.statements)


@unparse.register
def _(node: ast.Save) -> str:
    grad = "grad " if node.grad else ""
    name = f" as {node.name}" if node.name is not None else ""
    return f"save {grad}{unparse(node.site)}{name}"


@unparse.register
def _(node: ast.Set) -> str:
    grad = "grad " if node.grad else ""
    return f"set {grad}{unparse(node.site)} = {unparse(node.value)}"


@unparse.register
def _(node: ast.Patch) -> str:
    source = f" from {node.source}" if node.source is not None else ""
    function = f" with {unparse(node.function)}" if node.function is not None else ""
    return f"patch {unparse(node.site)}{source}{function}"


@unparse.register
def _(node: ast.Steer) -> str:
    return f"steer {unparse(node.site)} {node.op} {unparse(node.value)}"


@unparse.register
def _(node: ast.Prune) -> str:
    text = f"prune {unparse(node.param)} {unparse(node.amount)}"
    if not isinstance(node.criterion, ast.Magnitude):
        text += f" by {unparse(node.criterion)}"
    if node.dim is not None:
        text += f" along {node.dim}"
    return text


@unparse.register
def _(node: ast.Stop) -> str:
    return f"stop {unparse(node.site)}"


# ---- sites ----------------------------------------------------------------------------------


@unparse.register
def _(node: ast.Site) -> str:
    text = unparse(node.path)
    if node.call is not None:
        text += f"@{node.call}"
    if node.port is not None:
        text += unparse(node.port)
    if node.index is not None:
        text += unparse(node.index)
    return text


@unparse.register
def _(node: ast.Port) -> str:
    return f":{node.kind}" + (f".{node.item}" if node.item is not None else "")


@unparse.register
def _(node: ast.RegexPath) -> str:
    return f"/{node.pattern}/"


@unparse.register
def _(node: ast.Path) -> str:
    parts = []
    for position, segment in enumerate(node.segments):
        if isinstance(segment, ast.Index):
            parts.append(unparse(segment))
            continue
        if position > 0:
            parts.append(".")
        if isinstance(segment, ast.Attr):
            parts.append(_name(segment.name, head=position == 0))
        else:
            parts.append(unparse(segment))
    return "".join(parts)


def _name(name: str, head: bool = False) -> str:
    plain = _PLAIN_NAME.fullmatch(name) and not (head and name in _HEAD_KEYWORDS)
    return name if plain else f"<{name}>"


@unparse.register
def _(node: ast.AnyAttr) -> str:
    return "*"


@unparse.register
def _(node: ast.AttrSet) -> str:
    return "{" + ",".join(_name(n) for n in node.names) + "}"


@unparse.register
def _(node: ast.Index) -> str:
    return "[" + ", ".join(unparse(e) for e in node.entries) + "]"


@unparse.register
def _(node: ast.IntEntry) -> str:
    return str(node.value)


@unparse.register
def _(node: ast.Slice) -> str:
    def bound(b):
        return "" if b is None else unparse(b) if isinstance(b, ast.Var) else str(b)

    text = f"{bound(node.start)}:{bound(node.stop)}"
    return text + (f":{bound(node.step)}" if node.step is not None else "")


@unparse.register
def _(node: ast.EllipsisEntry) -> str:
    return "..."


@unparse.register
def _(node: ast.AllEntry) -> str:
    return "*"


@unparse.register
def _(node: ast.SetEntry) -> str:
    return "{" + ",".join(str(v) for v in node.values) + "}"


# ---- expressions ----------------------------------------------------------------------------


@unparse.register
def _(node: ast.Number) -> str:
    return repr(node.value)


@unparse.register
def _(node: ast.Var) -> str:
    return f"${node.name}"


@unparse.register
def _(node: ast.Saved) -> str:
    return f"@{node.name}"


@unparse.register
def _(node: ast.Zeros) -> str:
    return "zeros"


@unparse.register
def _(node: ast.Mean) -> str:
    return "mean"


@unparse.register
def _(node: ast.SiteValue) -> str:
    return "value"


@unparse.register
def _(node: ast.Call) -> str:
    return f"{unparse(node.function)}(" + ", ".join(unparse(a) for a in node.args) + ")"


@unparse.register
def _(node: ast.Neg) -> str:
    operand = unparse(node.operand)
    return f"-({operand})" if isinstance(node.operand, ast.BinOp) else f"-{operand}"


@unparse.register
def _(node: ast.BinOp) -> str:
    precedence = _PRECEDENCE[node.op]

    def side(child, right):
        text = unparse(child)
        if isinstance(child, ast.BinOp):
            inner = _PRECEDENCE[child.op]
            if inner < precedence or (right and inner == precedence):
                return f"({text})"
        return text

    return f"{side(node.left, False)} {node.op} {side(node.right, True)}"


# ---- pruning --------------------------------------------------------------------------------


@unparse.register
def _(node: ast.Amount) -> str:
    return f"{node.value!r}%" if node.percent else str(node.value)


@unparse.register
def _(node: ast.Magnitude) -> str:
    return "magnitude"


@unparse.register
def _(node: ast.Random) -> str:
    return "random" if node.seed is None else f"random({node.seed})"


@unparse.register
def _(node: ast.Importance) -> str:
    return unparse(node.var)
