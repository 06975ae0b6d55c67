"""A session's operations as one program for one call of the model (see `tdhook_fx.session`).

Each operation becomes statements at the sites its target names in this call's `SessionRoot`:

    capture (activation)        save SITE@c[index] as capture_I_c
    capture (gradient)          set grad SITE@c[index] = $grad_capture_I(value)   (records, returns value)
    replace with a value        set SITE@c[index] = 100            (a tensor: $replace_I)
    replace with a capture      set SITE@c[index] = @capture_J_c'  ($route_I(@...) to detach or transform)
    replace a gradient          set grad SITE@c[index] = 0         (a capture: $grad_route_I(value))
    replace a parameter         set model.PATH.weight[index] = -3
    stop                        save SITE as stopped_I; stop SITE

`c` runs over the calls `Target.occurrences` selects (every call by default). A live replacement
takes the latest capture of its source computed before it in this call (for gradients: after it
in the forward, so before it in the backward); none is an error, as in tdhook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdhook_fx.errors import InvalidArgument, MethodUsageError
from tdhook_fx.methods.paths import dsl_path, refer
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult
from tdhook_fx.methods.reads import pack, ports
from tdhook_fx.methods.session_root import INPUTS, MODEL, OUTPUTS, RootCall
from tdhook_fx.methods.targets import site_of, target_index, target_site
from tdhook_fx.syntax import ast
from tdhook_fx.targets import Target

STALE = "live replacement reached its target before a fresh source capture"


@dataclass
class Operation:
    """One capture, replacement or stop of a session, in declaration order (`index`)."""

    index: int
    kind: str  # "capture" | "replace" | "stop"
    target: Target | None
    direction: str | None
    prepend: bool = False
    captured: object = None  # capture: the CapturedTarget it fills
    detach: bool = True
    value: object = None  # replace: a number or tensor
    source: Operation | None = None  # replace: a live capture
    transform: Callable | None = None
    module_path: str | None = None  # stop
    stopped: object = None  # stop: the EarlyStopResult


@dataclass
class CallProgram:
    """The statements of one call, and what to do with its result."""

    builder: ProgramBuilder = field(default_factory=ProgramBuilder)
    captures: list = field(default_factory=list)  # (operation, [saved names in call order])
    stop: tuple | None = None  # (operation, sites, saved names)
    evidence: list = field(default_factory=list)  # (operation, calls of its module)


class CallBuilder:
    """Builds one call's program from the operations (see the module doc)."""

    def __init__(self, operations: list[Operation], call: RootCall, table, model: nn.Module, execution: int, stash: dict):
        self.operations = sorted(operations, key=lambda op: not op.prepend)  # stable: prepend first, then in order
        self.call = call
        self.table = table
        self.model = model
        self.execution = execution
        self.stash = stash  # gradient captures of this execution, by operation index
        self.program = CallProgram()
        self.statements: list = []  # (site order, statement)
        self.saved: dict[int, list] = {}  # capture operation index -> [(site order, saved name)]

    def build(self) -> CallProgram:
        stop_order = self._stop()
        for op in self.operations:
            if op.kind == "capture" and op.target.kind != "parameter":
                self._capture(op)
            elif op.kind == "replace":
                self._replace(op)
        builder = self.program.builder
        for order, statement in self.statements:
            if stop_order is None or order <= stop_order:
                builder.add(statement)
        if self.program.stop is not None:
            last = max(self.program.stop[1], key=lambda site: site.order)
            builder.add(ast.Stop(site_of(self.table, last)))
        return self.program

    # ---- where a target is, in this call -----------------------------------------------------

    def locate(self, op: Operation) -> list[tuple[int, object]]:
        """(call, site) for each call of the target's module the operation selects."""
        target = op.target
        ref = refer(self.model, self.model, target.module_path)
        if not ref.name:
            calls, located = 1, [(0, self._root_site(target, op.direction))]
        else:
            name = f"{MODEL}.{ref.name}"
            calls = self.table.calls(name)
            chosen = range(calls) if target.occurrences is None else target.occurrences
            if target.occurrences is not None and target.occurrences[-1] >= calls:
                occurrences = target.occurrences
                requested = f"occurrence {occurrences[0]}" if len(occurrences) == 1 else f"occurrences {occurrences}"
                raise MethodUsageError(
                    f"{op.kind} target {target.module_path!r} requested {requested}, but the module was called "
                    f"{calls} time(s) in this root-model execution"
                )
            located = [(c, target_site(self.table, name, ref.module, target, op.direction, c)) for c in chosen]
        if target.occurrences is not None:
            self.program.evidence.append((op, calls))
        return located

    def _root_site(self, target: Target, direction: str):
        path = tuple(target.output_path)
        if direction in ("fwd", "fwd_kwargs"):
            return self.table[f"{OUTPUTS}:out.{self.call.result.leaf_at(path)}"]
        if direction == "bwd_pre":
            return self.table[f"{OUTPUTS}:out.{_nth_leaf(range(self.call.result.leaves), path)}"]
        arguments = self.call.arguments
        if direction == "fwd_pre":
            leaf = arguments.child(0).leaf_at(path)
        elif direction == "fwd_pre_kwargs":
            leaf = arguments.leaf_at(path)
        else:  # bwd: the gradients at the positional tensor inputs
            positional = range(arguments.child(0).leaves)
            leaf = _nth_leaf(positional, path)
        return self.table[f"{INPUTS}:out.{leaf}"]

    def _indexed(self, site, target: Target) -> ast.Site:
        return site_of(self.table, site, target_index(self.program.builder, target, site.shape))

    # ---- operations --------------------------------------------------------------------------

    def _capture(self, op: Operation) -> None:
        builder = self.program.builder
        names = []
        for call, site in self.locate(op):
            indexed = self._indexed(site, op.target)
            if op.target.kind == "activation":
                name = f"capture_{op.index}_{call}"
                self.statements.append((site.order, ast.Save(indexed, name)))
                self.saved.setdefault(op.index, []).append((site.order, name))
                names.append(name)
            else:
                record = builder.call(self._gradient_recorder(op), f"grad_capture_{op.index}", ast.SiteValue())
                self.statements.append((site.order, ast.Set(indexed, record, grad=True)))
                self.saved.setdefault(op.index, []).append((site.order, None))
        if names:
            self.program.captures.append((op, names))

    def _gradient_recorder(self, op: Operation) -> Callable:
        execution, stash, captured, detach = self.execution, self.stash, op.captured, op.detach

        def record(grad):
            value = grad.detach().clone() if detach else grad
            captured._record(value, execution)
            stash[op.index] = (execution, value)
            return grad

        return record

    def _replace(self, op: Operation) -> None:
        if op.target.kind == "parameter":
            self._replace_parameter(op)
            return
        gradient = op.target.kind == "gradient"
        for _call, site in self.locate(op):
            indexed = self._indexed(site, op.target)
            if op.source is None:
                value = self._value(op)
            elif gradient:
                value = self.program.builder.call(self._gradient_router(op), f"grad_route_{op.index}", ast.SiteValue())
            else:
                value = self._routed(op, site)
            self.statements.append((site.order, ast.Set(indexed, value, grad=gradient)))

    def _value(self, op: Operation):
        value = op.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return ast.Number(value)
        return self.program.builder.var(f"replace_{op.index}", torch.as_tensor(value))

    def _routed(self, op: Operation, site):
        earlier = [(order, name) for order, name in self.saved.get(op.source.index, []) if order <= site.order]
        if not earlier:
            raise MethodUsageError(f"{STALE} ({op.source.target.module_path!r} runs after {op.target.module_path!r})")
        saved = ast.Saved(max(earlier)[1])
        if not op.source.detach and op.transform is None:
            return saved
        detach, transform = op.source.detach, op.transform

        def route(value):
            value = value.detach() if detach else value
            return torch.as_tensor(value if transform is None else transform(value))

        return self.program.builder.call(route, f"route_{op.index}", saved)

    def _gradient_router(self, op: Operation) -> Callable:
        execution, stash, source, transform = self.execution, self.stash, op.source, op.transform

        def route(grad):
            found = stash.get(source.index)
            if found is None or found[0] != execution:
                raise MethodUsageError(STALE)
            value = found[1] if transform is None else transform(found[1])
            return torch.broadcast_to(torch.as_tensor(value, dtype=grad.dtype, device=grad.device), grad.shape)

        return route

    def _replace_parameter(self, op: Operation) -> None:
        target = op.target
        ref = refer(self.model, self.model, target.module_path)
        parameter = target.parameter_of(ref.module)
        name = ".".join(p for p in (MODEL, ref.name, target.parameter) if p)
        index = target_index(self.program.builder, target, tuple(parameter.shape))
        site = ast.Site(dsl_path(name), None, None, index)
        self.statements.append((-1, ast.Set(site, self._value(op))))

    def _stop(self) -> int | None:
        """The earliest stop whose module runs in this call: its output saved, the graph cut there."""
        found = []
        for op in self.operations:
            if op.kind != "stop":
                continue
            ref = refer(self.model, self.model, op.module_path)
            name = f"{MODEL}.{ref.name}" if ref.name else MODEL
            sites = ports(self.table, name, "out", 0)
            if sites:
                found.append((max(s.order for s in sites), op, sites))
        if not found:
            return None
        order, op, sites = min(found, key=lambda item: item[0])
        names = []
        for site in sites:
            name = f"stopped_{op.index}_{len(names)}"
            self.statements.append((site.order, ast.Save(site_of(self.table, site), name)))
            names.append(name)
        self.program.stop = (op, sites, names)
        return order


def _nth_leaf(leaves: range, path: tuple) -> int:
    """The leaf a gradient tuple's slot names (tdhook's grad_input / grad_output are flat tuples)."""
    if not path:
        if len(leaves) != 1:
            raise InvalidArgument("Structured hook values require Target.output_path to select a tensor leaf")
        return leaves[0]
    if len(path) > 1 or not isinstance(path[0], int) or not -len(leaves) <= path[0] < len(leaves):
        raise InvalidArgument(f"output_path slot {path[0]!r} is out of range")
    return leaves[path[0]]


def stopped_output(program: CallProgram, result: ProgramResult):
    """The stopped module's exact output: one tensor, or its tensors in a tuple or dict."""
    _, sites, names = program.stop
    return pack(sites, [result.saved[name] for name in names])
