"""Module values as tdhook's hooks see them, read and replaced through program statements.

A tdhook hook sees a module's output (a tensor, a tuple or a dict), its inputs (`args`) or the
gradients at them (`grad_input`, `grad_output`). Here each of those is one or more DSL sites of
the module call (`M`, `M:out.0`, `M:in.x`): `add_read` saves them and turns the saved tensors
back into what the hook would have seen; `add_replace` splices a Python function that replaces
them into the graph; `grad_callback` adapts a tdhook gradient callback to `set grad`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.errors import TdhookFxError
from tdhook_fx.methods.paths import dsl_path
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.syntax import ast

FORWARD_PORT = {"fwd": "out", "fwd_kwargs": "out", "fwd_pre": "in", "fwd_pre_kwargs": "in"}
GRAD_PORT = {"bwd": "in", "bwd_pre": "out"}  # backward hooks: grad_input / grad_output
DIRECTION_TO_TYPE = {
    "fwd": "output",
    "bwd": "grad_input",
    "fwd_pre": "input",
    "bwd_pre": "grad_output",
    "fwd_kwargs": "output",
    "fwd_pre_kwargs": "input",
}


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


def save_inputs(builder: ProgramBuilder, table: SiteTable, name: str, call: int) -> list[ast.Saved]:
    """Save every tensor input of one call of module `name` (a hook's `args`); `@name` for each."""
    return [ast.Saved(builder.save(dsl_site(table, s), "args")) for s in ports(table, name, "in", call)]


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
    count = table.calls(name)
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
        arg_names = [saved.name for saved in save_inputs(builder, table, name, call)]
    return Read(label, module, kind, sites, names, arg_names, callback, dict(callback_kwargs, direction=direction))


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
    builder.add(ast.Set(dsl_site(table, sites[0]), builder.call(replace, prefix, ast.SiteValue(), *arguments)))


def grad_callback(callback: Callable, module: nn.Module, direction: str, has_value: bool = False) -> Callable:
    """A tdhook gradient-setting callback as a function of one gradient, for `set grad SITE = $f(value, ...)`.

    `direction` "bwd" calls `callback(module, grad_input=(grad,), grad_output=None, value, direction)`,
    "bwd_pre" calls `callback(module, grad_output=(grad,), value, direction)`; with `has_value` the
    function's second argument is the `value` given to the callback. The callback returns the new
    gradient (a tensor, or a tuple whose first element is used) or None to keep it.
    """

    def replace_grad(grad, *rest):
        given = rest[0] if has_value else None
        if direction == "bwd":
            result = callback(module=module, grad_input=(grad,), grad_output=None, value=given, direction=direction)
        else:
            result = callback(module=module, grad_output=(grad,), value=given, direction=direction)
        if result is None:
            return grad
        return result[0] if isinstance(result, (tuple, list)) else result

    return replace_grad
