"""Programs of the method layer: built as AST statements, compiled once, run with their values.

Every method (and every `run()` block) describes its work as a DSL program, built as AST
statements by a `ProgramBuilder`, with its tensors and Python callables as runtime values passed
with each call (never bound on a shared compiled module). `ProgramCache` compiles a program once
per (model, program text, keys, training mode, each input's dtype, device and shape) and counts
compilations, so a repeated call compiles nothing; `execute` calls the compiled module with
plain tensors and hands back its outputs and saved values.

Only the compiler's public surface is used: `compile`, `sites`, `CompiledModule` and the AST.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.compiler.compiled import GRAD_DELTA, SAVED, CompiledModule
from tdhook_fx.compiler.pipeline import compile as compile_program
from tdhook_fx.compiler.pipeline import sites as site_table_of
from tdhook_fx.methods.interface import ModelInterface
from tdhook_fx.syntax import ast


@dataclass
class ProgramBuilder:
    """Statements and their runtime values, named deterministically (same work -> same text)."""

    statements: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # runtime name -> tensor or Python callable
    _counts: dict = field(default_factory=dict)

    def name(self, prefix: str) -> str:
        number = self._counts.get(prefix, 0)
        self._counts[prefix] = number + 1
        return f"{prefix}_{number}"

    def var(self, prefix: str, value) -> ast.Var:
        """A `$name` bound to `value` (a tensor, a number or a Python callable)."""
        name = self.name(prefix)
        self.values[name] = value if callable(value) or isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return ast.Var(name)

    def add(self, statement) -> None:
        self.statements.append(statement)

    def save(self, site: ast.Site, prefix: str = "saved", grad: bool = False) -> str:
        """`save [grad] SITE as <prefix>_N`; returns the saved name."""
        name = self.name(prefix)
        self.add(ast.Save(site, name, grad=grad))
        return name

    def call(self, function, prefix: str, *args) -> ast.Call:
        """`$f(args...)` with `f` bound to a Python function."""
        return ast.Call(self.var(prefix, function), tuple(args))

    @property
    def program(self) -> ast.Program:
        return ast.Program(tuple(self.statements))


def signature(inputs: tuple) -> tuple:
    """What a compiled program depends on in its inputs: each one's dtype, device and shape."""
    return tuple((x.dtype, x.device, tuple(x.shape)) for x in inputs)


class ProgramCache:
    """Compiled programs, per model, by program text, keys, training mode and input signature.

    `compilations` counts the programs compiled (a cache miss). Each model keeps its
    `per_model` most recently used programs.
    """

    def __init__(self, per_model: int = 128):
        self._per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._limit = per_model
        self.compilations = 0

    def compiled(self, interface: ModelInterface, program: ast.Program | str, inputs: tuple, source: str) -> CompiledModule:
        text = program if isinstance(program, str) else str(program)
        key = (text, interface.call_keys, interface.out_keys, interface.model.training, signature(inputs))
        entries = self._per_model.setdefault(interface.model, OrderedDict())
        if key in entries:
            entries.move_to_end(key)
            return entries[key]
        compiled = compile_program(
            interface.model,
            text,
            example=inputs,
            in_keys=list(interface.call_keys),
            out_keys=list(interface.out_keys),
            source=source,
        )
        self.compilations += 1
        entries[key] = compiled
        if len(entries) > self._limit:
            entries.popitem(last=False)
        return compiled


PROGRAMS = ProgramCache()


def sites_for(interface: ModelInterface, inputs: tuple) -> SiteTable:
    """The model's site table on `inputs` (the compiler caches captures and tables)."""
    return site_table_of(interface.model, example=inputs, in_keys=list(interface.call_keys), out_keys=list(interface.out_keys))


@dataclass
class ProgramResult:
    outputs: dict | None  # out_key -> tensor (None when the program stops early)
    saved: dict  # saved name -> tensor
    compiled: CompiledModule
    grad_deltas: dict = field(default_factory=dict)  # `save grad` name -> the input to read .grad from

    def read_grads(self) -> dict | None:
        """After a backward: the saved gradients by name, None for a site no gradient reached
        (as a backward hook that never fires); None for all if there was no backward."""
        if not self.grad_deltas or all(delta.grad is None for delta in self.grad_deltas.values()):
            return None
        reached = {name for name, delta in self.grad_deltas.items() if delta.grad is not None}
        holder = {SAVED: {}, GRAD_DELTA: dict(self.grad_deltas)}
        grads = self.compiled.read_grads(holder)[SAVED]
        return {name: grad if name in reached else None for name, grad in grads.items()}


def execute(
    interface: ModelInterface,
    builder: ProgramBuilder | ast.Program,
    inputs: tuple,
    *,
    sources: dict | None = None,
    source: str = "program",
) -> ProgramResult:
    """Compile (or reuse) the builder's program for `inputs` and run it once."""
    program = builder.program if isinstance(builder, ProgramBuilder) else builder
    values = builder.values if isinstance(builder, ProgramBuilder) else {}
    compiled = PROGRAMS.compiled(interface, program, inputs, source)
    runtime = {name: values[name] for name in compiled.runtime_names if name in values}
    result = compiled(*inputs, **runtime, **(sources or {}))
    saved = dict(result.pop(SAVED, {}))
    deltas = dict(result.pop(GRAD_DELTA, {}))
    outputs = None
    if compiled.out_keys:
        outputs = dict(zip(interface.out_keys, result.values()))
    return ProgramResult(outputs, saved, compiled, deltas)
