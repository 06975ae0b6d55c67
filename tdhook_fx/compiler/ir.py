"""The resolved program: one intervention per concrete site, in program order.

Resolution (`resolve.py`) turns each AST statement into `Intervention`s; the rewrite passes
(`passes/`) read only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tdhook_fx.compiler.capture.sites import SiteInfo
from tdhook_fx.syntax import ast

# A resolved tensor index: ints, slices (bounds may be runtime values), Ellipsis, runtime values.
IndexItem = int | slice | type(Ellipsis) | ast.Var


def has_runtime_values(index: tuple[IndexItem, ...] | None) -> bool:
    """Whether a runtime value (`[:, $pos]`, `[$a:$b]`) is part of `index`: only a call knows
    the shape it selects."""
    for item in index or ():
        bounds = (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)
        if any(isinstance(b, ast.Var) for b in bounds):
            return True
    return False


def substitute(index: tuple[IndexItem, ...] | None, lookup) -> tuple | None:
    """`index` with each runtime value `$name` (alone or as a slice bound) replaced by `lookup(name)`."""
    if index is None:
        return None

    def item(i):
        if isinstance(i, ast.Var):
            return lookup(i.name)
        if isinstance(i, slice):
            return slice(*(lookup(b.name) if isinstance(b, ast.Var) else b for b in (i.start, i.stop, i.step)))
        return i

    return tuple(item(i) for i in index)


@dataclass(frozen=True)
class Intervention:
    """One statement applied at one site (a selector gives one per matched site)."""

    statement: ast.Statement
    site: SiteInfo
    index: tuple[IndexItem, ...] | None = None
    name: str | None = None  # save: the key under ("saved", name)

    @property
    def kind(self) -> str:
        grad = getattr(self.statement, "grad", False)
        return type(self.statement).__name__.lower() + ("_grad" if grad else "")

    def describe(self) -> str:
        """The statement as the user wrote it (canonically), with its place in the program."""
        span = self.statement.span
        where = f" (program:{span.line})" if span else ""
        return f"{self.statement}{where}"


@dataclass(frozen=True)
class ResolvedProgram:
    program: ast.Program
    interventions: tuple[Intervention, ...]
    runtime_names: tuple[str, ...]  # every $name, in order of first use
    patch_sources: tuple[str, ...]  # input groups that patches read, e.g. ("patched",)
    saved_names: tuple[str, ...] = field(default=())
    text: str | None = None  # the program text, for located errors found while rewriting
    aliases: tuple[tuple[str, str], ...] = ()  # (TransformerLens name as written, this model's site)

    @property
    def stops(self) -> bool:
        return any(i.kind == "stop" for i in self.interventions)

    def __str__(self) -> str:
        """The canonical program, each statement with the concrete sites it resolved to."""
        lines = ["program:"]
        lines.extend(f"  {line}" for line in str(self.program).splitlines())
        lines.append("sites:")
        statement = None
        for intervention in self.interventions:
            if intervention.statement is not statement:
                statement = intervention.statement
                line = statement.span.line if statement.span else "?"
                lines.append(f"  {line} | {statement}")
            target = intervention.site.describe()
            if intervention.index is not None:
                target += f" at [{index_text(intervention.index)}]"
            lines.append(f"    -> {target}")
        lines.append(f"runtime values: {', '.join('$' + n for n in self.runtime_names) or 'none'}")
        lines.append(f"saved values: {', '.join(self.saved_names) or 'none'}")
        return "\n".join(lines)


def index_text(index: tuple) -> str:
    """A resolved index as DSL text: `:, 0`, `..., 1:3`, `$pos`."""

    def item(i):
        if isinstance(i, slice):
            bounds = ("" if b is None else str(b) for b in (i.start, i.stop, i.step))
            return ":".join(bounds).rstrip(":") or ":"
        if i is Ellipsis:
            return "..."
        return str(i)

    return ", ".join(item(i) for i in index)
