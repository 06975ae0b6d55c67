"""Resolve: AST + site table -> one intervention per concrete site, every problem collected.

Paths are matched against the model's module tree (selectors expand; brackets pick container
elements while the module is a container and index the tensor otherwise), ports and call
indices against the sites seen on the example, and values against the sites' shapes. All
problems are raised together as one `ResolutionError`, sorted by position.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from tdhook_fx.compiler import aliases
from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.compiler.ir import Intervention, ResolvedProgram, has_runtime_values
from tdhook_fx.compiler.rules import rule_problem_at
from tdhook_fx.compiler.shapes import broadcasts_to, indexed_shape
from tdhook_fx.errors import Diagnostic, InvalidPattern, ResolutionError
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import LARGEST_INT, parse_site, source_text, too_deep_diagnostic
from tdhook_fx.syntax.regex import compile_pattern

DEFAULT_PATCH_SOURCE = "patched"
_LISTED = 12  # internal sites listed in an error before "..."
_CONTAINERS = (nn.ModuleList, nn.Sequential)


class _Problem(Exception):
    def __init__(self, span, message: str, *hints: str):
        super().__init__(message)
        self.diagnostic = Diagnostic(span, message, tuple(h for h in hints if h))


@dataclass
class _Match:
    module: str
    index: ast.Index | None  # brackets after a non-container module: a tensor index
    via_selector: bool


def resolve(program: ast.Program, sites: SiteTable, text: str | None = None, source: str = "program") -> ResolvedProgram:
    """Resolve `program` against `sites`; raise `ResolutionError` listing every problem."""
    return _Resolver(sites, None if text is None else source_text(text), source).run(program)


def match_sites(
    table: SiteTable, site: str | ast.Site, *, parameters: bool = False, whole_site_hint: str = "drop the [index]"
) -> list[SiteInfo]:
    """The sites of `table` that a DSL site names (selectors expand), in the model's order.

    `site` is DSL text (`transformer.h[*].mlp`, `h.0.attn:out.0`, `/mlp$/`) or an `ast.Site`. A
    module with several tensor outputs gives all of them, as `save` does. With `parameters=True`
    the text may also name parameters (`h.0.mlp.c_fc.weight`). A site with a tensor index is
    refused (it names part of a tensor; `whole_site_hint` says what to do instead). Raises `ResolutionError` naming the problem.
    """
    text = site if isinstance(site, str) else str(site)
    node = parse_site(text) if isinstance(site, str) else site
    resolver = _Resolver(table, text, "site")
    try:
        matched = resolver._activation_sites(node, many_ok=True)
    except _Problem as activation_problem:
        if not parameters or node.call is not None or node.port is not None or node.index is not None:
            raise ResolutionError([activation_problem.diagnostic], text, "site") from None
        try:
            return resolver._parameter_sites(node.path)
        except _Problem:
            raise ResolutionError([activation_problem.diagnostic], text, "site") from None
    if any(index is not None for _, index in matched):
        raise ResolutionError(
            [Diagnostic(node.span, f"'{text}' names part of a tensor; a whole site is needed here", (whole_site_hint,))],
            text,
            "site",
        )
    return sorted(dict.fromkeys(found for found, _ in matched), key=lambda s: s.order)


class _Resolver:
    def __init__(self, sites: SiteTable, text: str | None, source: str):
        self.sites = sites
        self.modules = sites.modules
        self.text = text
        self.source = source
        self.problems: list[Diagnostic] = []
        self.interventions: list[Intervention] = []
        self.saved: dict[str, tuple[SiteInfo, tuple | None]] = {}
        self.saved_grads: dict[str, SiteInfo] = {}  # save grad: name -> site
        self.runtime: dict[str, None] = {}
        self.patch_sources: dict[str, None] = {}
        self.stop: Intervention | None = None
        self.edited: set[str] = set()  # parameters a set/steer edits (a prune must come before)
        self.ruled: dict = {}  # (module, call) -> its rule statement
        self.aliases: dict[str, str] = {}  # TransformerLens name as written -> this model's site

    def run(self, program: ast.Program) -> ResolvedProgram:
        deep = ast.too_deep(program)  # a parsed program is checked already; one built by hand is here
        if deep is not None:
            raise ResolutionError([too_deep_diagnostic(deep)], self.text, self.source)
        for statement in program.statements:
            try:
                self._statement(statement)
            except _Problem as problem:
                self.problems.append(problem.diagnostic)
        self._check_after_stop()
        if self.problems:
            raise ResolutionError(self.problems, self.text, self.source)
        return ResolvedProgram(
            program,
            tuple(self.interventions),
            tuple(self.runtime),
            tuple(self.patch_sources),
            tuple(self.saved),
            self.text,
            tuple(self.aliases.items()),
        )

    # ---- statements ---------------------------------------------------------------------------

    def _statement(self, statement) -> None:
        if isinstance(statement, ast.Prune):
            self._prune(statement)
            return
        parameters = self._edited_parameters(statement)
        if parameters is not None:
            self._parameter_edit(statement, parameters)
            return
        targets = self._activation_sites(statement.site, many_ok=isinstance(statement, (ast.Save, ast.Rule)))
        if isinstance(statement, ast.Save) and statement.name is not None and len(targets) > 1:
            raise _Problem(
                statement.site.span,
                f"'as {statement.name}' names one value, but this site matches {len(targets)} sites",
                f"drop 'as {statement.name}' to save each under its own name "
                f"({', '.join(t.name for t, _ in targets[:3])}{', ...' if len(targets) > 3 else ''})",
            )
        for site, index in targets:
            resolved_index = self._index(index, site) if index is not None else None
            region = _region_shape(site, resolved_index)
            if getattr(statement, "grad", False):
                _check_differentiable(statement, site)
            if isinstance(statement, ast.Save):
                self._save(statement, site, resolved_index, region)
                continue
            intervention = Intervention(statement, site, resolved_index)
            if isinstance(statement, (ast.Set, ast.Steer)):
                self._value(statement.value, site, region, statement)
            elif isinstance(statement, ast.Patch):
                self.patch_sources[statement.source or DEFAULT_PATCH_SOURCE] = None
                if statement.function is not None:
                    self.runtime[statement.function.name] = None
            elif isinstance(statement, ast.Rule):
                self._rule(statement, site, index)
            elif isinstance(statement, ast.Stop):
                if self.stop is not None:
                    raise _Problem(
                        statement.span,
                        f"the program already stops at {self.stop.site.name}",
                        "a program can stop only once: keep the earliest stop",
                    )
                self.stop = intervention
            self.interventions.append(intervention)

    def _rule(self, statement: ast.Rule, site: SiteInfo, index) -> None:
        problem = rule_problem_at(statement, site, index, self.sites, self.ruled)
        if problem is not None:
            raise _Problem(statement.span, *problem)
        self.ruled[(site.module, site.call)] = statement

    def _save(self, statement: ast.Save, site: SiteInfo, index, region) -> None:
        name = statement.name or (f"{site.name}.grad" if statement.grad else site.name)
        if name in self.saved or name in self.saved_grads:
            own = _identifier(name) + "_2" if statement.grad else name + "_2"
            raise _Problem(
                statement.span,
                f"'{name}' is already saved by an earlier statement",
                f"give this value its own name: {ast.Save(statement.site, own, statement.grad)}",
            )
        if statement.grad:  # a gradient: it exists only after backward, so '@name' cannot read it
            self.saved_grads[name] = site
        else:
            self.saved[name] = (site, region)
        self.interventions.append(Intervention(statement, site, index, name))

    def _prune(self, statement: ast.Prune) -> None:
        for site in self._parameter_sites(statement.param):
            if site.name in self.edited:
                raise _Problem(statement.span, f"{site.name} is edited by an earlier statement", "put the prune first")
            numel = math.prod(site.shape)
            amount = statement.amount
            if not amount.percent and amount.value > numel:
                raise _Problem(
                    amount.span, f"cannot prune {amount.value} weights: {site.name} has only {numel}"
                )
            if statement.dim is not None and len(site.shape) < 2:
                raise _Problem(
                    statement.span,
                    f"{site.name} has {len(site.shape)} dimension; pruning along a dimension needs 2 or more",
                    "drop 'along ...' to prune single weights",
                )
            if statement.dim is not None and not -len(site.shape) <= statement.dim < len(site.shape):
                raise _Problem(
                    statement.span,
                    f"{site.name} has {len(site.shape)} dimensions; 'along {statement.dim}' is out of range",
                )
            if isinstance(statement.criterion, ast.Importance):
                self.runtime[statement.criterion.var.name] = None
            self.interventions.append(Intervention(statement, site))

    def _edited_parameters(self, statement) -> list[tuple[SiteInfo, ast.Index | None]] | None:
        """For `set`/`steer` whose site names a parameter (`fc.weight`, `fc.weight[0]`): its sites."""
        if not isinstance(statement, (ast.Set, ast.Steer)) or getattr(statement, "grad", False):
            return None
        site = statement.site
        if site.port is not None or site.call is not None or not isinstance(site.path, ast.Path):
            return None
        segments, index = site.path.segments, site.index
        if index is None and len(segments) > 1 and isinstance(segments[-1], ast.Index):
            segments, index = segments[:-1], segments[-1]  # `fc.weight[0]`: brackets after a parameter index it
        if not segments or not isinstance(segments[-1], ast.Attr):
            return None
        try:
            found = self._parameter_sites(ast.Path(tuple(segments), span=site.path.span))
        except _Problem:
            return None
        return [(parameter, index) for parameter in found]

    def _parameter_edit(self, statement, parameters) -> None:
        """A weight edited where its module uses it (see `passes.parameters`)."""
        for site, index in parameters:
            resolved_index = self._index(index, site) if index is not None else None
            _check_parameter_value(statement.value)
            self._value(statement.value, site, _region_shape(site, resolved_index), statement)
            self.edited.add(site.name)
            self.interventions.append(Intervention(statement, site, resolved_index))

    def _check_after_stop(self) -> None:
        if self.stop is None:
            return
        stop_position = next(i for i, x in enumerate(self.interventions) if x is self.stop)
        for position, intervention in enumerate(self.interventions):
            if intervention is self.stop or intervention.site.kind == "param":
                continue
            later = intervention.site.order > self.stop.site.order
            same_site_after = intervention.site.order == self.stop.site.order and position > stop_position
            if later or same_site_after:
                self.problems.append(
                    Diagnostic(
                        intervention.statement.span,
                        f"this never runs: the model stops at {self.stop.site.name} before it reaches "
                        f"{intervention.site.name}",
                        ("move the stop to a later site, or drop this statement",),
                    )
                )

    # ---- values -------------------------------------------------------------------------------

    def _value(self, expr, site: SiteInfo, region, statement) -> tuple | None:
        """Check `expr` against the site; returns its shape where known at compile time."""
        shape = self._expr_shape(expr, site, region)
        if shape is not None and region is not None:
            if not broadcasts_to(shape, region):
                raise _Problem(
                    expr.span,
                    f"a value of shape {_fmt(shape)} does not fit {site.name}"
                    f"{'[...]' if region != site.shape else ''} of shape {_fmt(region)}",
                    "the value must broadcast to the site's shape by torch's rules",
                )
        if not site.dtype.is_floating_point and not site.dtype.is_complex and _is_fractional(expr):
            raise _Problem(
                expr.span,
                f"{site.name} holds {str(site.dtype).removeprefix('torch.')} values; this value is not a whole number",
                "use whole numbers for integer sites (token ids, masks)",
            )
        _fold(expr, site)
        return shape

    def _expr_shape(self, expr, site: SiteInfo, region):
        if isinstance(expr, ast.Number):
            return ()
        if isinstance(expr, ast.Var):
            self.runtime[expr.name] = None
            return None
        if isinstance(expr, (ast.Zeros, ast.SiteValue)):
            return region
        if isinstance(expr, ast.Call):
            self.runtime[expr.function.name] = None
            for argument in expr.args:
                self._expr_shape(argument, site, region)
            return None
        if isinstance(expr, ast.Mean):
            return None if region is None else (1, *region[1:]) if region else ()
        if isinstance(expr, ast.Saved):
            return self._saved(expr, site)
        if isinstance(expr, ast.Neg):
            return self._expr_shape(expr.operand, site, region)
        left = self._expr_shape(expr.left, site, region)
        right = self._expr_shape(expr.right, site, region)
        if left is None or right is None:
            return None
        try:
            return tuple(torch.broadcast_shapes(left, right))
        except RuntimeError:
            raise _Problem(
                expr.span, f"cannot combine a value of shape {_fmt(left)} with one of shape {_fmt(right)}"
            ) from None

    def _saved(self, expr: ast.Saved, site: SiteInfo):
        if expr.name in self.saved_grads:
            raise _Problem(
                expr.span,
                f"'@{expr.name}' is a saved gradient, which exists only after the backward pass",
                "a statement can use activations saved earlier in the run ('save SITE as NAME'), not gradients",
            )
        if expr.name not in self.saved:
            close = difflib.get_close_matches(expr.name, list(self.saved), n=1)
            raise _Problem(
                expr.span,
                f"'@{expr.name}' is not saved before this statement",
                f"did you mean '@{close[0]}'?" if close else f"save it first: save SITE as {expr.name}",
            )
        saved_site, shape = self.saved[expr.name]
        if saved_site.order > site.order:
            raise _Problem(
                expr.span,
                f"'@{expr.name}' ({saved_site.name}) is computed after {site.name}, so it cannot be used there",
                "a value saved in this run can only flow forward, to sites the model computes later",
            )
        return shape

    # ---- indices ------------------------------------------------------------------------------

    def _index(self, index: ast.Index, site: SiteInfo) -> tuple:
        items = []
        for entry in index.entries:
            if isinstance(entry, ast.IntEntry):
                items.append(entry.value)
            elif isinstance(entry, ast.Slice):
                if isinstance(entry.step, int) and entry.step <= 0:
                    raise _Problem(
                        entry.span,
                        f"a tensor slice needs a positive step, not {entry.step}",
                        "torch indexes tensors with positive steps only"
                        + ("; to reverse a dimension, pass the value through a $f that flips it" if entry.step < 0 else ""),
                    )
                bounds = [self._bound(b) for b in (entry.start, entry.stop, entry.step)]
                items.append(slice(*bounds))
            elif isinstance(entry, ast.EllipsisEntry):
                items.append(Ellipsis)
            elif isinstance(entry, ast.Var):
                self.runtime[entry.name] = None
                items.append(entry)
            else:
                raise _Problem(
                    entry.span,
                    f"{site.name} is a tensor, not a container of modules: '{entry}' cannot index it",
                    "index a tensor with integers, slices, '...' or $name",
                )
        self._check_index(index, tuple(items), site)
        return tuple(items)

    def _bound(self, bound):
        if isinstance(bound, ast.Var):
            self.runtime[bound.name] = None
        return bound

    def _check_index(self, index: ast.Index, items: tuple, site: SiteInfo) -> None:
        plain = [i for i in items if i is not Ellipsis]
        if len(plain) > len(site.shape):
            raise _Problem(
                index.span,
                f"too many indices: {site.name} has {len(site.shape)} dimensions {_fmt(site.shape)}",
            )
        if items.count(Ellipsis) > 1:
            raise _Problem(index.span, "an index can only have one '...'")
        before = items.index(Ellipsis) if Ellipsis in items else len(items)
        for position, item in enumerate(items):
            if not isinstance(item, int):
                continue
            dim = position if position < before else len(site.shape) - (len(items) - position)
            size = site.shape[dim]
            if not -size <= item < size:
                raise _Problem(
                    index.span,
                    f"index {item} is out of range for dimension {dim} of {site.name} (size {size})",
                )

    # ---- sites --------------------------------------------------------------------------------

    def _activation_sites(self, site: ast.Site, many_ok: bool) -> list[tuple[SiteInfo, ast.Index | None]]:
        translated = self._transformer_lens(site)
        if translated is not None:
            text, own = translated
            self.aliases[str(site.path)] = text
            try:
                return self._activation_sites(own, many_ok)
            except _Problem as problem:
                message = f"{site.path} (a TransformerLens name) stands for {text}: {problem.diagnostic.message}"
                raise _Problem(site.span, message, *problem.diagnostic.hints) from None
        if isinstance(site.path, ast.RegexPath):
            matches = self._regex_modules(site.path)
        else:
            matches = self._match_path(site.path, activation=True)
        results = []
        skipped = []
        for match in matches:
            if match.index is not None and site.index is not None:
                raise _Problem(site.index.span, "a site can have only one tensor index")
            index = match.index if match.index is not None else site.index
            if self.sites.calls(match.module) == 0:
                if match.via_selector:
                    skipped.append(match.module)
                    continue
                module = self.modules[match.module]
                raise _Problem(
                    site.path.span,
                    f"{match.module} ({type(module).__name__}) is not called when the model runs on the example",
                    "only modules that forward calls have activations",
                )
            for found in self._ports(match.module, site, many_ok):
                results.append((found, index))
        if not results:
            raise _Problem(site.span, f"'{site.path}' matches no module that the model calls")
        return results

    def _transformer_lens(self, site: ast.Site) -> tuple[str, ast.Site] | None:
        """A TransformerLens name (`blocks.0.hook_resid_post`) as this model's own site, where no
        module of the model has the name; raises with the closest names for one it does not know."""
        path = site.path
        if not isinstance(path, ast.Path) or not aliases.is_tl_style(path) or path.segments[0].name in self.modules:
            return None
        text = aliases.translate(path, self.sites.model)
        if text is None:
            lacking = aliases.lacking(path, self.sites.model)
            if lacking is not None:
                raise _Problem(path.span, lacking[0], lacking[1])
            close = aliases.suggestions(path, self.sites.model)
            if not close:
                return None
            raise _Problem(path.span, f"unknown TransformerLens name '{path}'", f"did you mean {' or '.join(close)}?")
        own = parse_site(text)
        call = site.call if site.call is not None else own.call
        return text, ast.Site(own.path, call, site.port or own.port, site.index, span=site.span)

    def _ports(self, module: str, site: ast.Site, many_ok: bool) -> list[SiteInfo]:
        call = site.call or 0
        calls = self.sites.calls(module)
        if call >= calls:
            raise _Problem(
                site.span,
                f"{module} is called {calls} time{'s' if calls > 1 else ''} on the example; @{call} is out of range",
                f"use {' or '.join(f'@{c}' for c in range(min(calls, 3)))}",
            )
        kind = site.port.kind if site.port else "out"
        label = module + (f"@{call}" if call else "")
        if kind == "op":
            return [self._internal(module, call, label, site.port)]
        candidates = self.sites.activations(module, call, kind)
        if site.port is not None and site.port.item is not None:
            item = site.port.item
            if kind == "in" and isinstance(item, int):
                chosen = [candidates[item]] if item < len(candidates) else []
            else:
                chosen = [c for c in candidates if c.item == item]
            if not chosen:
                ports = ", ".join(_port_names(candidates)) or "none"
                raise _Problem(
                    site.port.span,
                    f"{label} has no {'input' if kind == 'in' else 'output'} '{item}'",
                    f"its {'inputs' if kind == 'in' else 'outputs'}: {ports}",
                )
            return chosen
        whole = [c for c in candidates if c.item is None]
        if whole:
            return whole
        if len(candidates) == 1 or (many_ok and candidates):
            return candidates
        what = "inputs" if kind == "in" else "outputs"
        raise _Problem(
            site.span,
            f"{label} has {len(candidates)} tensor {what}; say which one",
            f"pick one of: {', '.join(_port_names(candidates))}" if candidates else f"{label} has no tensor {what}",
        )

    def _internal(self, module: str, call: int, label: str, port: ast.Port) -> SiteInfo:
        """A value inside the module's forward (`attn:pattern`, `h.0:add_1`)."""
        name = f"{label}:{port.item}"
        if name in self.sites.internal:
            return self.sites.internal[name]
        inside = [s.item for s in self.sites.inside(module, call)]
        close = difflib.get_close_matches(port.item, inside, n=3, cutoff=0.5)
        hints = [f"did you mean {' or '.join(f':{c}' for c in close)}?" if close else ""]
        if port.item in ("output", "input", "outputs", "inputs"):
            hints.append("a module's output is :out (:out.N), its inputs :in.N or :in.NAME")
        if inside:
            shown = ", ".join(f":{n}" for n in inside[:_LISTED]) + (", ..." if len(inside) > _LISTED else "")
            hints.append(f"values inside {label}: {shown} (all of them: tdx.sites(...).inside({module!r}))")
        else:
            hints.append(f"{label} computes nothing of its own (its children do): name a value inside one of them")
        raise _Problem(port.span, f"{label} computes no value named '{port.item}'", *hints)

    def _regex_modules(self, path: ast.RegexPath) -> list[_Match]:
        pattern = _pattern(path)
        names = [n for n in self.modules if n and pattern.search(n)]
        if not names:
            raise _Problem(path.span, f"/{path.pattern}/ matches no module name")
        return [_Match(n, None, via_selector=True) for n in names]

    def _match_path(self, path: ast.Path, activation: bool) -> list[_Match]:
        modules = self.modules
        matches = [_Match("", None, via_selector=False)]
        segments = path.segments
        for position, segment in enumerate(segments):
            last = position == len(segments) - 1
            next_matches = []
            for match in matches:
                module = modules[match.module]
                if match.index is not None:
                    raise _Problem(segment.span, "a tensor index can only come at the end of a site")
                if isinstance(segment, ast.Index) and not isinstance(module, _CONTAINERS):
                    if last and activation and not segment.is_selector:
                        next_matches.append(_Match(match.module, segment, match.via_selector))
                        continue
                    raise _Problem(
                        segment.span,
                        f"{match.module or 'the model'} is a {type(module).__name__}, not a module container; "
                        f"'{segment}' cannot pick a module from it",
                        "brackets index the output tensor only at the end of a site",
                    )
                children = self._children(match, segment, path, position)
                selector = match.via_selector or not isinstance(segment, ast.Attr) and _is_selection(segment)
                next_matches.extend(_Match(c, None, selector) for c in children)
            matches = next_matches
        return matches

    def _children(self, match: _Match, segment, path: ast.Path, position: int) -> list[str]:
        module = self.modules[match.module]
        children = [name for name, child in module._modules.items() if child is not None]
        prefix = f"{match.module}." if match.module else ""
        if isinstance(segment, ast.Attr):
            if segment.name in children:
                return [prefix + segment.name]
            if isinstance(module, _CONTAINERS) and segment.name.lstrip("-").isdigit():
                self._position(int(segment.name), len(children), match.module, segment)
            raise self._unknown(match.module, module, segment, path, position)
        if isinstance(segment, ast.AnyAttr):
            return [prefix + c for c in children]
        if isinstance(segment, ast.AttrSet):
            missing = [n for n in segment.names if n not in children]
            if missing:
                raise _Problem(segment.span, f"{match.module or 'the model'} has no child module '{missing[0]}'")
            return [prefix + n for n in segment.names]
        (entry,) = segment.entries  # the parser moved multi-entry brackets to the tensor index
        positions = list(range(len(children)))
        if isinstance(entry, ast.AllEntry):
            chosen = positions
        elif isinstance(entry, ast.IntEntry):
            chosen = [self._position(entry.value, len(children), match.module, segment)]
        elif isinstance(entry, ast.SetEntry):
            chosen = [self._position(v, len(children), match.module, segment) for v in entry.values]
        else:
            if entry.step == 0:
                raise _Problem(entry.span, "a slice step cannot be 0", "write [::1] (or leave the step out) for every element")
            chosen = positions[slice(entry.start, entry.stop, entry.step)]
        return [prefix + children[i] for i in chosen]

    def _position(self, value: int, count: int, name: str, segment) -> int:
        if not -count <= value < count:
            raise _Problem(
                segment.span,
                f"{name or 'the model'} has {count} element{'s' if count != 1 else ''}; [{value}] is out of range",
                f"use an index from 0 to {count - 1} (or -1 for the last)" if count else "",
            )
        return value % count

    def _unknown(self, parent: str, module: nn.Module, segment: ast.Attr, path: ast.Path, position: int):
        written = ".".join(filter(None, [parent, segment.name] + [_dotted(s) for s in path.segments[position + 1 :]]))
        if segment.name in dict(module.named_parameters(recurse=False)) or segment.name in dict(module.named_buffers(recurse=False)):
            return _Problem(
                path.span,
                f"{written} is a parameter, not an activation",
                f"save, set, steer and patch act on module inputs and outputs; to prune it: prune {path} 50%",
            )
        names = [n for n in self.modules if n]
        close = difflib.get_close_matches(written, names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return _Problem(path.span, f"unknown module path '{path}'", hint)

    def _parameter_sites(self, param) -> list[SiteInfo]:
        parameters = [s for s in self.sites if s.kind == "param"]
        if isinstance(param, ast.RegexPath):
            pattern = _pattern(param)
            found = [s for s in parameters if pattern.search(s.name)]
            if not found:
                raise _Problem(param.span, f"/{param.pattern}/ matches no parameter name")
            return found
        *module_segments, last = param.segments
        owners = self._match_path(ast.Path(tuple(module_segments), span=param.span), activation=False) if module_segments else [_Match("", None, False)]
        found = []
        for owner in owners:
            name = f"{owner.module}.{last.name}" if owner.module else last.name
            if name in self.sites and self.sites[name].kind == "param":
                found.append(self.sites[name])
            elif not owner.via_selector:
                module = self.modules[owner.module]
                if last.name in module._modules:
                    hint = f"prune one of its parameters: {', '.join(f'{name}.{p}' for p, _ in module._modules[last.name].named_parameters(recurse=False))}"
                    raise _Problem(param.span, f"{name} is a module, not a parameter", hint)
                own = [p for p, _ in module.named_parameters(recurse=False)]
                raise _Problem(
                    last.span,
                    f"{owner.module or 'the model'} has no parameter '{last.name}'",
                    f"its parameters: {', '.join(own)}" if own else "",
                )
        if not found:
            raise _Problem(param.span, f"'{param}' matches no parameter")
        return found


def _pattern(path: ast.RegexPath):
    """The selector's pattern, compiled to match in linear time (an AST built by hand is checked here)."""
    try:
        return compile_pattern(path.pattern)
    except InvalidPattern as error:
        raise _Problem(path.span, error.reason, *error.hints) from None


def _check_parameter_value(expr) -> None:
    """A weight edit is computed before the forward's values: no `@name`, no batch `mean`."""
    for node in _walk(expr):
        if isinstance(node, (ast.Saved, ast.Mean)):
            raise _Problem(
                node.span,
                f"'{node}' is a value of the forward pass; a parameter edit takes numbers, runtime values, "
                "'value' (the weight) and 'zeros'",
            )


def _walk(expr):
    yield expr
    if isinstance(expr, ast.Neg):
        yield from _walk(expr.operand)
    elif isinstance(expr, ast.BinOp):
        yield from _walk(expr.left)
        yield from _walk(expr.right)
    elif isinstance(expr, ast.Call):
        for argument in expr.args:
            yield from _walk(argument)


def _check_differentiable(statement, site: SiteInfo) -> None:
    if not site.dtype.is_floating_point and not site.dtype.is_complex:
        verb = "save grad" if isinstance(statement, ast.Save) else "set grad"
        raise _Problem(
            statement.site.span,
            f"{site.name} holds {str(site.dtype).removeprefix('torch.')} values, which have no gradient",
            f"'{verb}' needs a floating-point site (for token ids, use the embedding's output)",
        )


def _identifier(name: str) -> str:
    """A name usable after 'as' (letters, digits, underscores)."""
    name = re.sub(r"\W+", "_", name).strip("_") or "value"
    return name if not name[0].isdigit() else f"_{name}"


def _is_selection(segment) -> bool:
    if isinstance(segment, (ast.AnyAttr, ast.AttrSet)):
        return True
    return isinstance(segment, ast.Index) and (segment.is_selector or isinstance(segment.entries[0], ast.Slice))


def _dotted(segment) -> str:
    if isinstance(segment, ast.Attr):
        return segment.name
    if isinstance(segment, ast.Index) and isinstance(segment.entries[0], ast.IntEntry):
        return str(segment.entries[0].value)
    return "*"


def _port_names(sites: list[SiteInfo]) -> list[str]:
    return [f":{s.kind}" + (f".{s.item}" if s.item is not None else "") for s in sites]


def _region_shape(site: SiteInfo, index) -> tuple | None:
    """The shape of site[index] on the example (None if a runtime value decides it)."""
    if index is None:
        return site.shape
    if has_runtime_values(index):
        return None
    return tuple(indexed_shape(site.shape, index))


_FOLD = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _fold(expr, site: SiteInfo, outermost: bool = True):
    """The value of `expr` if it is a constant (None otherwise), computed as the rewrite folds it
    (Python arithmetic, operation by operation); each constant part that reaches torch must be
    a number the site's dtype holds. Raises `_Problem` where the folding would fail or overflow.
    """
    if isinstance(expr, ast.Number):
        value = expr.value
    elif isinstance(expr, ast.Neg):
        value = _fold(expr.operand, site, outermost=False)
        value = None if value is None else -value
    elif isinstance(expr, ast.BinOp):
        left = _fold(expr.left, site, outermost=False)
        right = _fold(expr.right, site, outermost=False)
        if expr.op == "/" and right == 0:
            raise _Problem(expr.span, "division by zero", "a constant divisor cannot be 0")
        if left is not None and right is not None:
            value = _FOLD[expr.op](left, right)
        else:  # one side is a tensor: a constant on the other side goes to torch as it is
            for part, part_value in ((expr.left, left), (expr.right, right)):
                if part_value is not None:
                    _check_fits(part, part_value, site)
            value = None
    elif isinstance(expr, ast.Call):  # the function gets constant arguments as Python numbers
        for argument in expr.args:
            _fold(argument, site, outermost=False)
        value = None
    else:
        value = None
    if value is not None:
        _check_finite(expr, value)
        if outermost:
            _check_fits(expr, value, site)
    return value


def _check_finite(expr, value) -> None:
    if isinstance(value, int) and abs(value) > LARGEST_INT:
        raise _Problem(
            expr.span,
            f"this value is {_magnitude(value)}, too large: whole numbers lie between -(2**63 - 1) and 2**63 - 1",
            "write one of the numbers as a decimal (2.0 instead of 2) to compute in floating point",
        )
    if not math.isfinite(value):
        raise _Problem(
            expr.span,
            f"this value overflows to {value}",
            "a value must be a finite number (the largest is about 1.8e308)",
        )


def _check_fits(expr, value, site: SiteInfo) -> None:
    """A constant that torch will cast to the site's dtype must be representable in it."""
    dtype = site.dtype
    if dtype.is_complex or dtype == torch.bool:
        return
    limits = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    if not limits.min <= value <= limits.max:
        name = str(dtype).removeprefix("torch.")
        raise _Problem(
            expr.span,
            f"{value:g} does not fit {site.name}, which holds {name} values (from {limits.min:g} to {limits.max:g})",
            f"use a value within {name}'s range",
        )


def _magnitude(value: int) -> str:
    return str(value) if len(str(value)) <= 24 else f"about 10**{len(str(abs(value))) - 1}"


def _is_fractional(expr) -> bool:
    if isinstance(expr, ast.Number):
        return isinstance(expr.value, float) and not expr.value.is_integer()
    if isinstance(expr, ast.Mean):
        return True
    if isinstance(expr, ast.Neg):
        return _is_fractional(expr.operand)
    if isinstance(expr, ast.BinOp):
        return expr.op == "/" or _is_fractional(expr.left) or _is_fractional(expr.right)
    return False



def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
