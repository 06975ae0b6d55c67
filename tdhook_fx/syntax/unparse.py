"""Canonical DSL text of an AST node: `parse(unparse(p)) == p` for every parsed program.

`str(node)` calls `unparse`. The printers are found by the node's class name, so this module
needs nothing from `tdhook_fx.syntax.ast` (which imports it): the AST and its printer do not
import each other.

Printing does not recurse: `unparse` lists the nodes children first, and each printer joins
the texts already made for its children (`text(child)`), so a program of any depth prints.
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
    if not _is_node(node):
        raise InvalidArgumentType(f"not an AST node: {node!r}")
    texts: dict[int, str] = {}

    def text(child) -> str:  # the printers' view of the texts made so far
        if id(child) not in texts:
            raise InvalidArgumentType(f"not an AST node: {child!r}")
        return texts[id(child)]

    for each in _children_first(node):
        texts[id(each)] = _PRINTERS[type(each).__name__](each, text)
    return texts[id(node)]


def _is_node(value) -> bool:
    return type(value).__name__ in _PRINTERS and type(value).__module__.startswith("tdhook_fx.syntax")


def _children_first(node) -> list:
    """Every node inside `node` (itself included), each after all the nodes it holds."""
    order, pending = [], [node]
    while pending:
        value = pending.pop()
        if _is_node(value):
            order.append(value)
            pending.extend(getattr(value, name) for name in value.__dataclass_fields__)
        elif isinstance(value, tuple):
            pending.extend(value)
    order.reverse()
    return order


def _prints(*names: str):
    def register(function):
        for name in names:
            _PRINTERS[name] = function
        return function

    return register


def _is(node, name: str) -> bool:
    return type(node).__name__ == name


@_prints("Program")
def _(node, text) -> str:
    return "\n".join(text(s) for s in node.statements)


@_prints("Save")
def _(node, text) -> str:
    grad = "grad " if node.grad else ""
    name = f" as {node.name}" if node.name is not None else ""
    return f"save {grad}{text(node.site)}{name}"


@_prints("Set")
def _(node, text) -> str:
    grad = "grad " if node.grad else ""
    return f"set {grad}{text(node.site)} = {text(node.value)}"


@_prints("Patch")
def _(node, text) -> str:
    source = f" from {node.source}" if node.source is not None else ""
    function = f" with {text(node.function)}" if node.function is not None else ""
    return f"patch {text(node.site)}{source}{function}"


@_prints("Steer")
def _(node, text) -> str:
    return f"steer {text(node.site)} {node.op} {text(node.value)}"


@_prints("Prune")
def _(node, text) -> str:
    printed = f"prune {text(node.param)} {text(node.amount)}"
    if not _is(node.criterion, "Magnitude"):
        printed += f" by {text(node.criterion)}"
    if node.dim is not None:
        printed += f" along {node.dim}"
    return printed


@_prints("Stop")
def _(node, text) -> str:
    return f"stop {text(node.site)}"


@_prints("Rule")
def _(node, text) -> str:
    args = "(" + ", ".join(repr(a) for a in node.args) + ")" if node.args else ""
    return f"rule {text(node.site)} = {node.name}{args}"


# ---- sites ----------------------------------------------------------------------------------


@_prints("Site")
def _(node, text) -> str:
    printed = text(node.path)
    if node.call is not None:
        printed += f"@{node.call}"
    if node.port is not None:
        printed += text(node.port)
    if node.index is not None:
        printed += text(node.index)
    return printed


@_prints("Port")
def _(node, text) -> str:
    return f":{node.kind}" + (f".{node.item}" if node.item is not None else "")


@_prints("RegexPath")
def _(node, text) -> str:
    return f"/{node.pattern}/"


@_prints("Path")
def _(node, text) -> str:
    parts = []
    for position, segment in enumerate(node.segments):
        if _is(segment, "Index"):
            parts.append(text(segment))
            continue
        if position > 0:
            parts.append(".")
        if _is(segment, "Attr"):
            parts.append(_name(segment.name, head=position == 0))
        else:
            parts.append(text(segment))
    return "".join(parts)


def _name(name: str, head: bool = False) -> str:
    plain = _PLAIN_NAME.fullmatch(name) and not (head and name in _HEAD_KEYWORDS)
    return name if plain else f"<{name}>"


@_prints("AnyAttr")
def _(node, text) -> str:
    return "*"


@_prints("AttrSet")
def _(node, text) -> str:
    return "{" + ",".join(_name(n) for n in node.names) + "}"


@_prints("Index")
def _(node, text) -> str:
    return "[" + ", ".join(text(e) for e in node.entries) + "]"


@_prints("IntEntry")
def _(node, text) -> str:
    return str(node.value)


@_prints("Slice")
def _(node, text) -> str:
    def bound(b):
        return "" if b is None else text(b) if _is(b, "Var") else str(b)

    printed = f"{bound(node.start)}:{bound(node.stop)}"
    return printed + (f":{bound(node.step)}" if node.step is not None else "")


@_prints("EllipsisEntry")
def _(node, text) -> str:
    return "..."


@_prints("AllEntry")
def _(node, text) -> str:
    return "*"


@_prints("SetEntry")
def _(node, text) -> str:
    return "{" + ",".join(str(v) for v in node.values) + "}"


# ---- expressions ----------------------------------------------------------------------------


@_prints("Number")
def _(node, text) -> str:
    return repr(node.value)


@_prints("Var")
def _(node, text) -> str:
    return f"${node.name}"


@_prints("Saved")
def _(node, text) -> str:
    return f"@{node.name}"


@_prints("Zeros")
def _(node, text) -> str:
    return "zeros"


@_prints("Mean")
def _(node, text) -> str:
    return "mean"


@_prints("SiteValue")
def _(node, text) -> str:
    return "value"


@_prints("Call")
def _(node, text) -> str:
    return f"{text(node.function)}(" + ", ".join(text(a) for a in node.args) + ")"


@_prints("Neg")
def _(node, text) -> str:
    operand = text(node.operand)
    return f"-({operand})" if _is(node.operand, "BinOp") else f"-{operand}"


@_prints("BinOp")
def _(node, text) -> str:
    precedence = _PRECEDENCE[node.op]

    def side(child, right):
        printed = text(child)
        if _is(child, "BinOp"):
            inner = _PRECEDENCE[child.op]
            if inner < precedence or (right and inner == precedence):
                return f"({printed})"
        return printed

    return f"{side(node.left, False)} {node.op} {side(node.right, True)}"


# ---- pruning --------------------------------------------------------------------------------


@_prints("Amount")
def _(node, text) -> str:
    return f"{node.value!r}%" if node.percent else str(node.value)


@_prints("Magnitude")
def _(node, text) -> str:
    return "magnitude"


@_prints("Random")
def _(node, text) -> str:
    return "random" if node.seed is None else f"random({node.seed})"


@_prints("Importance")
def _(node, text) -> str:
    return text(node.var)
