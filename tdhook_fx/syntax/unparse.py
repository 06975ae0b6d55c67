"""Canonical DSL text of an AST node: `parse(unparse(p)) == p` for every parsed program.

`str(node)` calls `unparse`. The printers are found by the node's class name, so this module
needs nothing from `tdhook_fx.syntax.ast` (which imports it): the AST and its printer do not
import each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tdhook_fx.errors import InvalidArgumentType

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
# Keywords the lexer prefers over a name where a path starts (`save grad ...`).
_HEAD_KEYWORDS = {"grad"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


_PRINTERS: dict[str, Callable] = {}


def unparse(node) -> str:
    """The canonical DSL text of an AST node."""
    printer = _PRINTERS.get(type(node).__name__)
    if printer is None or not type(node).__module__.startswith("tdhook_fx.syntax"):
        raise InvalidArgumentType(f"not an AST node: {node!r}")
    return printer(node)


def _prints(*names: str):
    def register(function):
        for name in names:
            _PRINTERS[name] = function
        return function

    return register


def _is(node, name: str) -> bool:
    return type(node).__name__ == name


@_prints("Program")
def _(node) -> str:
    return "\n".join(unparse(s) for s in node.statements)


@_prints("Save")
def _(node) -> str:
    grad = "grad " if node.grad else ""
    name = f" as {node.name}" if node.name is not None else ""
    return f"save {grad}{unparse(node.site)}{name}"


@_prints("Set")
def _(node) -> str:
    grad = "grad " if node.grad else ""
    return f"set {grad}{unparse(node.site)} = {unparse(node.value)}"


@_prints("Patch")
def _(node) -> str:
    source = f" from {node.source}" if node.source is not None else ""
    function = f" with {unparse(node.function)}" if node.function is not None else ""
    return f"patch {unparse(node.site)}{source}{function}"


@_prints("Steer")
def _(node) -> str:
    return f"steer {unparse(node.site)} {node.op} {unparse(node.value)}"


@_prints("Prune")
def _(node) -> str:
    text = f"prune {unparse(node.param)} {unparse(node.amount)}"
    if not _is(node.criterion, "Magnitude"):
        text += f" by {unparse(node.criterion)}"
    if node.dim is not None:
        text += f" along {node.dim}"
    return text


@_prints("Stop")
def _(node) -> str:
    return f"stop {unparse(node.site)}"


@_prints("Rule")
def _(node) -> str:
    args = "(" + ", ".join(repr(a) for a in node.args) + ")" if node.args else ""
    return f"rule {unparse(node.site)} = {node.name}{args}"


# ---- sites ----------------------------------------------------------------------------------


@_prints("Site")
def _(node) -> str:
    text = unparse(node.path)
    if node.call is not None:
        text += f"@{node.call}"
    if node.port is not None:
        text += unparse(node.port)
    if node.index is not None:
        text += unparse(node.index)
    return text


@_prints("Port")
def _(node) -> str:
    return f":{node.kind}" + (f".{node.item}" if node.item is not None else "")


@_prints("RegexPath")
def _(node) -> str:
    return f"/{node.pattern}/"


@_prints("Path")
def _(node) -> str:
    parts = []
    for position, segment in enumerate(node.segments):
        if _is(segment, "Index"):
            parts.append(unparse(segment))
            continue
        if position > 0:
            parts.append(".")
        if _is(segment, "Attr"):
            parts.append(_name(segment.name, head=position == 0))
        else:
            parts.append(unparse(segment))
    return "".join(parts)


def _name(name: str, head: bool = False) -> str:
    plain = _PLAIN_NAME.fullmatch(name) and not (head and name in _HEAD_KEYWORDS)
    return name if plain else f"<{name}>"


@_prints("AnyAttr")
def _(node) -> str:
    return "*"


@_prints("AttrSet")
def _(node) -> str:
    return "{" + ",".join(_name(n) for n in node.names) + "}"


@_prints("Index")
def _(node) -> str:
    return "[" + ", ".join(unparse(e) for e in node.entries) + "]"


@_prints("IntEntry")
def _(node) -> str:
    return str(node.value)


@_prints("Slice")
def _(node) -> str:
    def bound(b):
        return "" if b is None else unparse(b) if _is(b, "Var") else str(b)

    text = f"{bound(node.start)}:{bound(node.stop)}"
    return text + (f":{bound(node.step)}" if node.step is not None else "")


@_prints("EllipsisEntry")
def _(node) -> str:
    return "..."


@_prints("AllEntry")
def _(node) -> str:
    return "*"


@_prints("SetEntry")
def _(node) -> str:
    return "{" + ",".join(str(v) for v in node.values) + "}"


# ---- expressions ----------------------------------------------------------------------------


@_prints("Number")
def _(node) -> str:
    return repr(node.value)


@_prints("Var")
def _(node) -> str:
    return f"${node.name}"


@_prints("Saved")
def _(node) -> str:
    return f"@{node.name}"


@_prints("Zeros")
def _(node) -> str:
    return "zeros"


@_prints("Mean")
def _(node) -> str:
    return "mean"


@_prints("SiteValue")
def _(node) -> str:
    return "value"


@_prints("Call")
def _(node) -> str:
    return f"{unparse(node.function)}(" + ", ".join(unparse(a) for a in node.args) + ")"


@_prints("Neg")
def _(node) -> str:
    operand = unparse(node.operand)
    return f"-({operand})" if _is(node.operand, "BinOp") else f"-{operand}"


@_prints("BinOp")
def _(node) -> str:
    precedence = _PRECEDENCE[node.op]

    def side(child, right):
        text = unparse(child)
        if _is(child, "BinOp"):
            inner = _PRECEDENCE[child.op]
            if inner < precedence or (right and inner == precedence):
                return f"({text})"
        return text

    return f"{side(node.left, False)} {node.op} {side(node.right, True)}"


# ---- pruning --------------------------------------------------------------------------------


@_prints("Amount")
def _(node) -> str:
    return f"{node.value!r}%" if node.percent else str(node.value)


@_prints("Magnitude")
def _(node) -> str:
    return "magnitude"


@_prints("Random")
def _(node) -> str:
    return "random" if node.seed is None else f"random({node.seed})"


@_prints("Importance")
def _(node) -> str:
    return unparse(node.var)
