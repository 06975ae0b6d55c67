"""Adapters: splice modules into the graph, from a source module's output to a target's.

`Adapters({"a": (adapter, source, target)})` compiles, for `source == target`, to
`set TARGET = $adapter_0(value)` and otherwise to `save SOURCE as saved_0` followed by
`set TARGET = $adapter_0(@saved_0, value)`: the adapter module runs inside the rewritten
graph on the source's output (or `cache_callback(...)` of it) and its result replaces the
target's output. As in tdhook, the adapter also gets the keyword arguments it names among
`module`, `args`, `output` (the target's own output, when the source differs) and
`direction`; the source values are kept in the context's `cache` as `f"{source}_output"`.
The adapters are submodules of the hooked module (`hooked.adapters`), so they can be trained.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.errors import MethodUsageError, TdhookFxError
from tdhook_fx.methods.context import HookingContextWithCache, OnePassMethod
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.paths import refer
from tdhook_fx.methods.reads import add_replace, dsl_site, ports, save_inputs
from tdhook_fx.syntax import ast


class HookedModuleWithAdapters(HookedModule):
    def __init__(self, *args, adapters: dict[str, nn.Module], **kwargs):
        super().__init__(*args, **kwargs)
        self.adapters = nn.ModuleDict(adapters)


class Adapters(OnePassMethod):
    """Replace target outputs by adapter modules applied to source outputs."""

    _hooked_module_class = HookedModuleWithAdapters
    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        adapters: dict[str, tuple[nn.Module, str, str]],
        cache_callback: Callable | None = None,
        relative: bool = True,
        directions: list[str] | None = None,
        cache: TensorDictBase | None = None,
        clear_cache: bool = True,
    ):
        super().__init__()
        if any(d != "fwd" for d in directions or ["fwd"]):
            raise MethodUsageError("tdhook_fx Adapters act on module outputs: directions=['fwd'] only")
        self._hooked_module_kwargs["adapters"] = {name: spec[0] for name, spec in adapters.items()}
        self._hooking_context_kwargs.update(cache=cache, clear_cache=clear_cache)
        self._adapters = dict(adapters)
        self._cache_callback = cache_callback
        self._relative = relative

    def build(self, hooked, builder, table, td):
        interface = hooked.interface
        base = interface.base(self._relative)
        to_cache = []
        for adapter_name, (_, source, target) in self._adapters.items():
            adapter = hooked.adapters[adapter_name]
            source_ref = refer(base, interface.model, source)
            target_ref = refer(base, interface.model, target)
            for call in range(table.calls(target_ref.name)):
                if source == target:
                    self._same_site(builder, table, adapter, target_ref, call)
                else:
                    to_cache.append(self._from_source(builder, table, adapter, source_ref, target_ref, call))
        cache = hooked.hooking_context.cache

        def store(result, td) -> None:
            for key, holder, saved_name in to_cache:
                value = holder.get("value")
                cache.set(key, result.saved[saved_name] if value is None else value)

        return store

    def _same_site(self, builder, table, adapter, ref, call) -> None:
        module = ref.module
        wanted = _needs_args(adapter)
        arguments = save_inputs(builder, table, ref.name, call) if wanted else []

        def apply(output, *args):
            offered = {"module": module, "args": tuple(args), "direction": "fwd"}
            return adapter(output, **accepted_kwargs(adapter, offered))

        add_replace(builder, table, ref.key, ref.name, call, apply, *arguments, prefix="adapter")

    def _from_source(self, builder, table, adapter, source_ref, target_ref, call):
        target_order = min(s.order for s in ports(table, target_ref.name, "out", call))
        source_calls = [
            c
            for c in range(table.calls(source_ref.name))
            if max(s.order for s in ports(table, source_ref.name, "out", c)) < target_order
        ]
        if not source_calls:
            raise TdhookFxError(
                f"adapter source {source_ref.key} does not run before its target {target_ref.key}; "
                "an adapter reads the source's output, so the source must come first"
            )
        source_call = source_calls[-1]
        source_sites = ports(table, source_ref.name, "out", source_call)
        if len(source_sites) != 1:
            raise TdhookFxError(
                f"adapter source {source_ref.key} produces {len(source_sites)} tensors; it needs one"
            )
        saved_name = builder.save(dsl_site(table, source_sites[0]), "adapter_source")
        arguments = [ast.Saved(saved_name)]
        if self._cache_callback is not None or _needs_args(adapter):
            arguments += save_inputs(builder, table, target_ref.name, call)
        holder: dict = {}
        cache_key = f"{source_ref.key}_output"
        source_module, module, callback = source_ref.module, target_ref.module, self._cache_callback

        def apply(output, source_value, *args):
            if callback is not None:
                source_value = callback(
                    module=source_module, args=(), output=source_value, key=cache_key, direction="fwd"
                )
                holder["value"] = source_value
            offered = {"module": module, "args": tuple(args), "output": output, "direction": "fwd"}
            return adapter(source_value, **accepted_kwargs(adapter, offered))

        add_replace(
            builder, table, target_ref.key, target_ref.name, call, apply, *arguments, prefix="adapter"
        )
        return cache_key, holder, saved_name


def _needs_args(adapter) -> bool:
    target = adapter.forward if isinstance(adapter, nn.Module) else adapter
    parameters = inspect.signature(target).parameters
    return "args" in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())



def accepted_kwargs(function: Callable, offered: dict) -> dict:
    """The entries of `offered` that `function` accepts by name (all of them with **kwargs)."""
    target = function.forward if isinstance(function, nn.Module) else function
    parameters = inspect.signature(target).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in parameters}
