"""The bridge from the tdhook method layer to the compiler: build a program, compile it once, run it.

Every method (and every `run()` block) describes its work as a DSL program, built as AST
statements by a `ProgramBuilder`, with its tensors and Python callables as runtime values.
`ProgramCache` compiles a program once per (model, program text, keys, mode, input
signature) and counts compilations, so a repeated run compiles nothing; `execute` calls the
compiled module with plain tensors and hands back its outputs and saved values.

Only the compiler's public surface is used: `tdhook_fx.compile`, `tdhook_fx.sites`,
`CompiledModule` and the AST node classes of `tdhook_fx.syntax.ast`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.compiler.compiled import GRAD_DELTA, CompiledModule
from tdhook_fx.errors import TdhookFxError
from tdhook_fx.methods.paths import dsl_path
from tdhook_fx.compiler.pipeline import DEFAULT_IN_KEYS, DEFAULT_OUT_KEYS
from tdhook_fx.compiler.pipeline import compile as compile_program
from tdhook_fx.compiler.pipeline import sites as site_table_of
from tdhook_fx.syntax import ast


class MissingInputKey(TdhookFxError, KeyError):
    """The input TensorDict lacks a key that the method reads."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class MethodUsageError(TdhookFxError, RuntimeError):
    """A method was used in a way it does not support (outside its context, twice, ...)."""


# ---- the model behind a TensorDict ------------------------------------------------------------


@dataclass(frozen=True)
class ModelInterface:
    """How a TensorDict feeds a model: which keys it reads and writes, and where paths start.

    `model` is the module that gets compiled; `root` is where relative paths start (the
    model, or a caller-given TensorDictModule as tdhook does); `hook_root` is where
    `relative=False` paths start (a `TensorDictModule` around the model, so `module.0`).
    """

    model: nn.Module
    root: nn.Module
    hook_root: nn.Module
    in_keys: tuple  # the TensorDict keys holding the model inputs, in call order
    call_keys: tuple  # the names the compiler gets (keyword names for in_keys={kwarg: key})
    out_keys: tuple

    @classmethod
    def build(cls, module: nn.Module, in_keys=None, out_keys=None) -> ModelInterface:
        from tensordict.nn import TensorDictModule, TensorDictModuleBase

        if isinstance(module, TensorDictModule):
            _check_subset(in_keys, module.in_keys, "in_keys")
            _check_subset(out_keys, module.out_keys, "out_keys")
            kwargs = getattr(module, "_kwargs", None)
            call_keys = tuple(kwargs) if kwargs else tuple(module.in_keys)
            return cls(
                module.module, module, module, tuple(module.in_keys), call_keys, tuple(module.out_keys)
            )
        if isinstance(module, TensorDictModuleBase):
            raise MethodUsageError(
                f"tdhook_fx compiles plain nn.Modules and TensorDictModules, not a {type(module).__name__}\n"
                "  hint: prepare the nn.Module inside it, with in_keys=[...] and out_keys=[...]"
            )
        if isinstance(in_keys, dict):
            call_keys, td_keys = tuple(in_keys), tuple(in_keys.values())
        else:
            td_keys = tuple(in_keys or DEFAULT_IN_KEYS)
            call_keys = td_keys
        out_keys = tuple(out_keys or DEFAULT_OUT_KEYS)
        wrapper = TensorDictModule(module, list(td_keys), list(out_keys))
        return cls(module, module, wrapper, td_keys, call_keys, out_keys)

    def base(self, relative: bool) -> nn.Module:
        return self.root if relative else self.hook_root

    def inputs(self, td: TensorDictBase, group=None, purpose: str = "model input", hint: str = "") -> tuple:
        """The model inputs in `td` (or under `(group, key)`), each checked to be there."""
        values = []
        for key in self.in_keys:
            full = key if group is None else join_keys(group, key)
            values.append(require(td, full, purpose, hint))
        return tuple(values)


def _check_subset(given, available, what: str) -> None:
    for key in given or []:
        if key not in available:
            raise ValueError(f"Key {key} not in module.{what}")


def never_called(key: str, consequence: str) -> TdhookFxError:
    """The error for a module the method names but the model does not call on these inputs."""
    return TdhookFxError(f"{key} is never called when the model runs on these inputs, so {consequence}")


def require(td: TensorDictBase, key, purpose: str, hint: str = "") -> Any:
    """`td[key]`, or a `MissingInputKey` that names the key, why it is needed, and the fix."""
    value = td.get(key, None)
    if value is None:
        keys = sorted(map(str, td.keys(include_nested=True, leaves_only=True)))
        message = f"the input TensorDict has no {key!r} ({purpose}); its keys: {keys}"
        raise MissingInputKey(message + (f"\n  hint: {hint}" if hint else ""))
    return value


# ---- sites --------------------------------------------------------------------------------------


def sites_for(interface: ModelInterface, inputs: tuple) -> SiteTable:
    """The model's site table on `inputs` (the compiler caches captures and tables)."""
    return site_table_of(
        interface.model, example=inputs, in_keys=list(interface.call_keys), out_keys=list(interface.out_keys)
    )


def calls(table: SiteTable, name: str) -> int:
    """How many times the model calls module `name` on the example (0: never)."""
    return table.calls(name)


def ports(table: SiteTable, name: str, kind: str, call: int = 0) -> list[SiteInfo]:
    """The tensors a module call produces (kind "out") or receives ("in") that eager code sees."""
    return [s for s in table.activations(name, call, kind) if s.eager]


def dsl_site(table: SiteTable, site: SiteInfo) -> ast.Site:
    """The DSL site that names exactly `site`."""
    call = site.call or None
    if site.kind == "out":
        port = None if site.item is None else ast.Port("out", site.item)
    elif isinstance(site.item, int):  # `:in.N` counts the call's inputs in order
        position = [s.name for s in table.activations(site.module, site.call, "in")].index(site.name)
        port = ast.Port("in", position)
    else:
        port = ast.Port("in", site.item)
    return ast.Site(dsl_path(site.module), call, port)


def pack(sites: list[SiteInfo], values: list) -> Any:
    """What a hook would see: one tensor, a tuple (None where not a tensor) or a dict."""
    if len(sites) == 1 and sites[0].item is None:
        return values[0]
    if all(isinstance(s.item, int) for s in sites):
        packed: list = [None] * (max(s.item for s in sites) + 1)
        for site, value in zip(sites, values):
            packed[site.item] = value
        return tuple(packed)
    return {s.item: v for s, v in zip(sites, values)}


def unpack(sites: list[SiteInfo], value: Any, what: str) -> list[torch.Tensor]:
    """The tensors at `sites` inside a value shaped as `pack` makes it."""
    if len(sites) == 1 and sites[0].item is None:
        if not isinstance(value, torch.Tensor):
            raise TdhookFxError(f"{what} returned a {type(value).__name__}; a tensor is needed here")
        return [value]
    if isinstance(value, torch.Tensor) and len(sites) == 1:
        return [value]
    try:
        return [value[s.item] for s in sites]
    except (TypeError, KeyError, IndexError):
        items = ", ".join(str(s.item) for s in sites)
        raise TdhookFxError(
            f"{what} returned a {type(value).__name__}; the module's output holds tensors at {items}, "
            "so return a value of the same structure (a tuple or dict)"
        ) from None


# ---- building a program -------------------------------------------------------------------------


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
        self.values[name] = (
            value if callable(value) or isinstance(value, torch.Tensor) else torch.as_tensor(value)
        )
        return ast.Var(name)

    def add(self, statement) -> None:
        self.statements.append(statement)

    def save(self, site: ast.Site, prefix: str = "saved") -> str:
        name = self.name(prefix)
        self.add(ast.Save(site, name))
        return name

    def call(self, function, prefix: str, *args) -> ast.Call:
        """`$f(args...)` with `f` bound to a Python function."""
        return ast.Call(self.var(prefix, function), tuple(args))

    @property
    def program(self) -> ast.Program:
        return ast.Program(tuple(self.statements))


# ---- compiling and running ------------------------------------------------------------------------


class ProgramCache:
    """Compiled programs, per model, by program text, keys, mode and input signature.

    `compilations` counts the programs compiled (a cache miss). Each model
    keeps its `per_model` most recently used programs.
    """

    def __init__(self, per_model: int = 128):
        self._per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._limit = per_model
        self.compilations = 0

    def compiled(
        self, interface: ModelInterface, program: ast.Program | str, inputs: tuple, source: str
    ) -> CompiledModule:
        text = program if isinstance(program, str) else str(program)
        signature = tuple((x.dtype, tuple(x.shape)) for x in inputs)
        key = (text, interface.call_keys, interface.out_keys, interface.model.training, signature)
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
        holder = {"saved": {}, GRAD_DELTA: dict(self.grad_deltas)}
        grads = self.compiled.read_grads(holder)["saved"]
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
    saved = dict(result.pop("saved", {}))
    deltas = dict(result.pop(GRAD_DELTA, {}))
    outputs = None
    if compiled.out_keys:
        outputs = {key: value for key, value in zip(interface.out_keys, result.values())}
    return ProgramResult(outputs, saved, compiled, deltas)


# ---- reading and replacing a module's values ------------------------------------------------------

FORWARD_PORT = {"fwd": "out", "fwd_kwargs": "out", "fwd_pre": "in", "fwd_pre_kwargs": "in"}


@dataclass
class Read:
    """A module value saved by a program, turned into what a tdhook hook would have seen."""

    key: str  # the module as the user named it
    module: nn.Module
    kind: str  # "out" or "in"
    sites: list  # the SiteInfos saved
    names: list  # their saved names
    arg_names: list  # saved inputs, for a callback's `args`
    callback: Callable | None = None
    callback_kwargs: dict = field(default_factory=dict)  # extra keyword arguments (key, direction)

    @property
    def order(self) -> int:
        return max(s.order for s in self.sites)

    def value(self, saved: dict, what: str = "a cache") -> Any:
        values = [saved[n] for n in self.names]
        if self.kind == "in":
            args = tuple(values)
            if self.callback is not None:
                return self.callback(module=self.module, args=args, **self.callback_kwargs)
            if len(values) == 1:
                return values[0]
            raise TdhookFxError(
                f"{self.key} takes {len(values)} tensor inputs; {what} holds one tensor\n"
                "  hint: pass callback=lambda **kw: kw['args'][0] to pick one"
            )
        output = pack(self.sites, values)
        if self.callback is not None:
            args = tuple(saved[n] for n in self.arg_names)
            output = self.callback(module=self.module, args=args, output=output, **self.callback_kwargs)
        return output

    def tensor(self, saved: dict, what: str = "a cache") -> Any:
        """`value`, checked to be something a TensorDict holds (tdhook refuses tuples too)."""
        value = self.value(saved, what)
        if not isinstance(value, (torch.Tensor, TensorDictBase)):
            raise TdhookFxError(
                f"{type(value).__name__} values are not supported for caching ({self.key} produces one); "
                "use a `callback` to return a tensor, e.g. callback=lambda **kw: kw['output'][0]"
            )
        return value


def add_read(
    builder: ProgramBuilder,
    table: SiteTable,
    label: str,
    name: str,
    module: nn.Module,
    direction: str = "fwd",
    callback: Callable | None = None,
    call: int | None = None,
    **callback_kwargs,
) -> Read | None:
    """Save a module's output (or inputs) at its last call (or `call`); None if it never runs."""
    count = calls(table, name)
    if not count:
        return None
    call = count - 1 if call is None else call
    kind = FORWARD_PORT[direction]
    sites = ports(table, name, kind, call)
    if not sites:
        return None
    names = [builder.save(dsl_site(table, s)) for s in sites]
    arg_names = []
    if callback is not None and kind == "out":
        arg_names = [builder.save(dsl_site(table, s), "args") for s in ports(table, name, "in", call)]
    return Read(
        label, module, kind, sites, names, arg_names, callback, dict(callback_kwargs, direction=direction)
    )


def add_replace(
    builder: ProgramBuilder,
    table: SiteTable,
    label: str,
    name: str,
    call: int,
    function: Callable,
    *arguments,
    prefix: str = "fn",
    kind: str = "out",
) -> None:
    """`set SITE@call = $f(value, arguments...)`: `function(value, *arguments)` replaces the value.

    `function` receives the module's output as a hook would (a tensor, or a tuple with None
    where the output is not a tensor) and returns its replacement (None keeps it).
    """
    sites = ports(table, name, kind, call)
    if len(sites) != 1:
        raise TdhookFxError(
            f"{label} {'produces' if kind == 'out' else 'takes'} {len(sites)} tensors; a Python function can "
            "replace a module's value where it is one tensor"
        )

    def replace(current, *rest):
        replacement = function(pack(sites, [current]), *rest)
        if replacement is None:
            return current
        return unpack(sites, replacement, f"the function spliced at {label}")[0]

    replace.__name__ = prefix
    builder.add(
        ast.Set(dsl_site(table, sites[0]), builder.call(replace, prefix, ast.SiteValue(), *arguments))
    )
