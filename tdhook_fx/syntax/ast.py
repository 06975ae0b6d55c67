"""The program as data: frozen dataclasses, one per grammar rule, each with a source span.

`==` ignores spans, so a parsed program equals one built by hand or re-parsed from its
canonical text (`str(node)`, see `unparse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from tdhook_fx.errors import Span
from tdhook_fx.syntax.unparse import unparse


def _span():
    return field(default=None, compare=False, repr=False, kw_only=True)


class Node:
    """Base of all AST nodes; `str(node)` is its canonical DSL text."""

    span: Span | None

    def __str__(self) -> str:
        return unparse(self)


# ---- index entries (inside `[...]`) ---------------------------------------------------------


@dataclass(frozen=True, eq=True)
class Var(Node):
    """`$name`: a runtime value from the input TensorDict or `CompiledModule.bind`."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class IntEntry(Node):
    value: int
    span: Span | None = _span()


@dataclass(frozen=True)
class Slice(Node):
    """`start:stop:step`; each bound is an int, a `Var` or None."""

    start: int | Var | None = None
    stop: int | Var | None = None
    step: int | Var | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class EllipsisEntry(Node):
    span: Span | None = _span()


@dataclass(frozen=True)
class AllEntry(Node):
    """`[*]`: every element of a module container."""

    span: Span | None = _span()


@dataclass(frozen=True)
class SetEntry(Node):
    """`[{0,5,10}]`: the listed elements of a module container."""

    values: tuple[int, ...]
    span: Span | None = _span()


IndexEntry = Union[IntEntry, Var, Slice, EllipsisEntry, AllEntry, SetEntry]


@dataclass(frozen=True)
class Index(Node):
    """One `[...]`: picks container elements or indexes a tensor (resolution decides)."""

    entries: tuple[IndexEntry, ...]
    span: Span | None = _span()

    @property
    def is_tensor_index(self) -> bool:
        """True where the brackets can only index a tensor (a comma, `...` or a `$name`)."""
        return len(self.entries) > 1 or any(
            isinstance(e, (EllipsisEntry, Var))
            or (isinstance(e, Slice) and any(isinstance(b, Var) for b in (e.start, e.stop, e.step)))
            for e in self.entries
        )

    @property
    def is_selector(self) -> bool:
        """True where the brackets can only select modules (`[*]`, `[{0,5}]`)."""
        return any(isinstance(e, (AllEntry, SetEntry)) for e in self.entries)


# ---- paths and sites ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attr(Node):
    """`.name` (also `.0` and `<odd/name>`)."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class AnyAttr(Node):
    """`.*`: every child module."""

    span: Span | None = _span()


@dataclass(frozen=True)
class AttrSet(Node):
    """`.{a,b}`: the listed child modules."""

    names: tuple[str, ...]
    span: Span | None = _span()


Segment = Union[Attr, AnyAttr, AttrSet, Index]


@dataclass(frozen=True)
class Path(Node):
    """A module (or parameter) path in tdhook's syntax plus selectors."""

    segments: tuple[Segment, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class RegexPath(Node):
    """`/pattern/`: every module whose dotted name matches (searched as `re.search` does, in linear
    time: `tdhook_fx.syntax.regex`)."""

    pattern: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Port(Node):
    """`:out`, `:out.0`, `:in`, `:in.0`, `:in.hidden_states`."""

    kind: Literal["out", "in"]
    item: int | str | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Site(Node):
    """An addressable point: a path, an optional call index, port and tensor index."""

    path: Path | RegexPath
    call: int | None = None
    port: Port | None = None
    index: Index | None = None
    span: Span | None = _span()


# ---- expressions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Number(Node):
    value: int | float
    span: Span | None = _span()


@dataclass(frozen=True)
class Saved(Node):
    """`@name`: a value saved earlier in the same run."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Zeros(Node):
    """`zeros`: zeros shaped like the site's value."""

    span: Span | None = _span()


@dataclass(frozen=True)
class Mean(Node):
    """`mean`: the site's value averaged over the batch (mean ablation)."""

    span: Span | None = _span()


@dataclass(frozen=True)
class SiteValue(Node):
    """`value`: the site's current (indexed) value; in `set grad`, the incoming gradient."""

    span: Span | None = _span()


@dataclass(frozen=True)
class Call(Node):
    """`$f(a, b)`: call a Python function bound as a runtime value (the DSL never runs Python text)."""

    function: Var
    args: tuple[Expr, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True)
class BinOp(Node):
    op: Literal["+", "-", "*", "/"]
    left: Expr
    right: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Neg(Node):
    operand: Expr
    span: Span | None = _span()


Expr = Union[Number, Var, Saved, Zeros, Mean, SiteValue, Call, BinOp, Neg]


# ---- pruning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Amount(Node):
    """`50%` (percent=True) or a count of weights (percent=False)."""

    value: int | float
    percent: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class Magnitude(Node):
    span: Span | None = _span()


@dataclass(frozen=True)
class Random(Node):
    seed: int | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Importance(Node):
    """`by $scores`: prune the weights with the lowest given scores."""

    var: Var
    span: Span | None = _span()


Criterion = Union[Magnitude, Random, Importance]


# ---- statements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Save(Node):
    site: Site
    name: str | None = None
    grad: bool = False
    span: Span | None = _span()


@dataclass(frozen=True)
class Set(Node):
    site: Site
    value: Expr
    grad: bool = False
    span: Span | None = _span()


@dataclass(frozen=True)
class Patch(Node):
    """Replace the site's value by the one it has on the source input (`("patched", key)`).

    `with $f`: the new value is `f(value, source_value)` instead.
    """

    site: Site
    source: str | None = None
    function: Var | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Steer(Node):
    site: Site
    op: Literal["+=", "-=", "*="]
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Prune(Node):
    param: Path | RegexPath
    amount: Amount
    criterion: Criterion = field(default_factory=Magnitude)
    dim: int | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Stop(Node):
    site: Site
    span: Span | None = _span()


@dataclass(frozen=True)
class Rule(Node):
    """`rule SITE = NAME(ARGS)`: relevance through the module at SITE propagates by the LRP rule
    NAME (tdhook_fx.compiler.rules lists them) with numeric arguments ARGS."""

    site: Site
    name: str
    args: tuple[int | float, ...] = ()
    span: Span | None = _span()


Statement = Union[Save, Set, Patch, Steer, Prune, Stop, Rule]


@dataclass(frozen=True)
class Program(Node):
    statements: tuple[Statement, ...] = ()
    span: Span | None = _span()


# How deeply nodes may nest (each operator, sign, call and bracket is one level). The walkers
# over a program (printing, resolution, the rewrite, the reference) recurse once per level, so
# this bound keeps each of them far below Python's recursion limit; `parse` refuses a program
# that passes it, with the place (`too_deep`).
MAX_DEPTH = 100


def too_deep(node) -> Node | None:
    """The first node, in source order, nested more than `MAX_DEPTH` levels inside `node`
    (`node` is level 1), or None. Walks without recursion, so any depth can be checked."""
    pending = [(node, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, Node):
            if depth > MAX_DEPTH:
                return value
            children = [getattr(value, name) for name in value.__dataclass_fields__]
            pending.extend((child, depth + 1) for child in reversed(children))
        elif isinstance(value, (tuple, list)):
            pending.extend((item, depth) for item in reversed(value))
    return None


def variables(node) -> list[str]:
    """The names of every runtime value (`$name`) in `node`, in order, without repeats."""
    found: dict[str, None] = {}
    pending = [node]
    while pending:
        value = pending.pop()
        if isinstance(value, Var):
            found[value.name] = None
        elif isinstance(value, Node):
            pending.extend(reversed([getattr(value, name) for name in value.__dataclass_fields__]))
        elif isinstance(value, (tuple, list)):
            pending.extend(reversed(value))
    return list(found)
