"""Targets compiled into DSL sites: the tensor a hook would see, and the units selected in it.

A tdhook hook on a module sees its output (`fwd`), its arguments (`fwd_pre`, or `(args,
kwargs)` for `fwd_pre_kwargs`), or the gradients at them (`bwd`: grad_input, `bwd_pre`:
grad_output); a `Target`'s `output_path` picks one tensor in that value and its
`feature_axis`/`indices` some units of it. Here the tensor is a site of the module call
(`blocks.1`, `blocks.1:out.0`, `blocks.1:in.x`) and the units a tensor index that keeps the
axis: index 3 of the last axis is `[..., 3:4]`, indices 1 and 3 `[..., $target_idx_0]` (a
runtime index tensor).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.errors import InvalidArgument
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reads import Read, dsl_site, ports
from tdhook_fx.syntax import ast
from tdhook_fx.targets import Target

PORT_OF_DIRECTION = {
    "fwd": "out",
    "fwd_kwargs": "out",
    "bwd_pre": "out",
    "fwd_pre": "in",
    "fwd_pre_kwargs": "in",
    "bwd": "in",
}


def target_index(builder: ProgramBuilder, target: Target, shape: tuple) -> ast.Index:
    """The tensor index selecting `target`'s units in a value of `shape` (the axis is kept)."""
    axis = target.check_indices(tuple(shape))
    chosen = _chosen(builder, target.indices)
    if target.feature_axis < 0:
        entries = (ast.EllipsisEntry(), chosen, *(ast.Slice() for _ in range(-target.feature_axis - 1)))
    else:
        entries = (*(ast.Slice() for _ in range(axis)), chosen, ast.EllipsisEntry())
    return ast.Index(entries)


def _chosen(builder: ProgramBuilder, indices: tuple[int, ...]):
    """A slice for a run of consecutive indices of one sign, else a runtime index tensor."""
    first, last = indices[0], indices[-1]
    consecutive = list(indices) == list(range(first, last + 1))
    if consecutive and (first >= 0 or last < 0):
        return ast.Slice(first, None if last == -1 else last + 1)
    return builder.var("target_idx", torch.tensor(indices))


def target_site(table: SiteTable, name: str, module: nn.Module, target: Target, direction: str, call: int) -> SiteInfo:
    """The site of call `call` of module `name` holding the tensor `target.output_path` picks."""
    kind = PORT_OF_DIRECTION[direction]
    sites = ports(table, name, kind, call)
    path = tuple(target.output_path)
    if direction == "fwd_pre_kwargs":
        if not path:
            raise InvalidArgument("Structured hook values require Target.output_path to select a tensor leaf")
        if path[0] not in (0, 1) or len(path) < 2:
            raise InvalidArgument(f"output_path component {path[0]!r} does not match the hook value structure")
        if path[0] == 0:
            found, rest = _positional(sites, module, path[1], target), path[2:]
        else:
            found, rest = _by_item(sites, path[1], target), path[2:]
    elif direction in ("fwd_pre", "bwd"):
        if not path:
            found, rest = _only(sites, target), ()
        elif direction == "fwd_pre":
            found, rest = _positional(sites, module, path[0], target), path[1:]
        else:
            found, rest = _nth(sites, path[0], target), path[1:]
    elif direction == "bwd_pre":
        found, rest = (_only(sites, target), ()) if not path else (_nth(sites, path[0], target), path[1:])
    else:
        found, rest = (_only(sites, target), ()) if not path else (_by_item(sites, path[0], target), path[1:])
    if rest:
        raise InvalidArgument(
            f"output_path {list(path)} of the Target on '{target.module_path}' goes inside a value nested in the "
            "module's output; tdhook_fx names the tensors of a module's inputs and outputs one level deep\n"
            "  hint: target the module that produces the inner tensor"
        )
    return found


def _only(sites: list[SiteInfo], target: Target) -> SiteInfo:
    whole = [s for s in sites if s.item is None]
    if whole:
        return whole[0]
    if len(sites) == 1:
        return sites[0]
    raise InvalidArgument(
        f"Structured hook values require Target.output_path to select a tensor leaf "
        f"('{target.module_path}' has {len(sites)} tensors there)"
    )


def _nth(sites: list[SiteInfo], position, target: Target) -> SiteInfo:
    if not isinstance(position, int) or not -len(sites) <= position < len(sites):
        raise InvalidArgument(f"output_path slot {position!r} is out of range")
    return sites[position]


def _by_item(sites: list[SiteInfo], item, target: Target) -> SiteInfo:
    for site in sites:
        if site.item == item:
            return site
    if isinstance(item, int):
        raise InvalidArgument(f"output_path slot {item} is out of range (or not a tensor) at '{target.module_path}'")
    raise InvalidArgument(f"output_path key {item!r} is missing (or not a tensor) at '{target.module_path}'")


def _positional(sites: list[SiteInfo], module: nn.Module, position, target: Target) -> SiteInfo:
    """The site of positional argument `position` (named by its parameter where it has one)."""
    if not isinstance(position, int):
        raise InvalidArgument(f"output_path component {position!r} does not match the hook value structure")
    names = _positional_names(module)
    item = names[position] if 0 <= position < len(names) else position
    for site in sites:
        if site.item in (item, position):
            return site
    raise InvalidArgument(f"output_path slot {position} is out of range (or not a tensor) at '{target.module_path}'")


def _positional_names(module: nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def site_of(table: SiteTable, site: SiteInfo, index: ast.Index | None = None) -> ast.Site:
    """The DSL site naming `site`, with a tensor index."""
    plain = dsl_site(table, site)
    return ast.Site(plain.path, plain.call, plain.port, index)


def target_output(builder: ProgramBuilder, table: SiteTable, name: str, module: nn.Module, target: Target, call: int):
    """(the site, the indexed DSL site) of `target`'s units in call `call` of module `name`'s output."""
    site = target_site(table, name, module, target, "fwd", call)
    return site, site_of(table, site, target_index(builder, target, site.shape))


def selected_read(key, module: nn.Module, site: SiteInfo, name: str) -> Read:
    """A `Read` of one saved selection: its value is the saved tensor itself (never a tuple)."""
    return Read(key, module, "out", [dataclasses.replace(site, item=None)], [name], [])
