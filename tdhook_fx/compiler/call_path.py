"""The eager call of a compiled module, generated as Python code for one variant.

On a small model the wrapper around the graph costs as much as a few layers: reading each input
and runtime value, checking, packing the outputs. `fast_call` writes that wrapper for one
program (its input count, runtime value names, output keys and saved names unrolled into straight
code) instead of interpreting them on every call, and keeps the checks:

- the model is checked before every call by the variant's guard (`capture.state.guard`);
- runtime values keep their shape check (`ops.fit`, inside the graph);
- a TensorDict's batch size is checked against the outputs once per signature (batch size and
  input and runtime value shapes) when the graph's output shapes follow from its input shapes,
  at every call otherwise; a TensorDict of another class, with a device, locked, or holding a
  non-tensor where the call reads or writes goes through `CompiledModule._call` (the general
  path, which also raises every error with its message).

The generated function takes the module as its first argument and holds no reference to it,
so a compiled module is freed by reference counting (no cycle through its own call path).
"""

from __future__ import annotations

import threading

import torch
from tensordict import TensorDict
from torch import fx

from tdhook_fx.compiler.capture.call_plan import key_name
from tdhook_fx.compiler.runner import runner
from tdhook_fx.errors import TdhookFxError

SAVED = "saved"


def fast_call(cm, variant):
    """`call(cm, args, kwargs)` for `variant`: built on its first call (the runner with it)."""
    if variant.rewritten.grad_names:
        return _with_grad_inputs
    if variant.rewritten.source_inputs or cm.__dict__.get("_compile_args") is not None:
        return _general  # the general call runs the torch.compiled graph (`cm.compile()`)

    def first(self, args, kwargs):
        built = _generate(self, variant)
        if self.__dict__.get("_variant") is variant:
            self.__dict__["_fast"] = built
        return built(self, args, kwargs)

    return first


def _general(self, args, kwargs):
    return self._call(args, kwargs)


def _with_grad_inputs(self, args, kwargs):
    return self._call_making_grad_inputs(args, kwargs)


def _bound_value(name: str) -> list[str]:
    """Lines reading a value bound with `bind` (as `CompiledModule._runtime` does: a function
    first, then a tensor buffer; `_runtime` itself raises when there is none)."""
    return [
        f"    value = self._functions.get({name!r})",
        "    if value is None:",
        f"        value = self._buffers.get(self._bound.get({name!r}, ''))",
        "        if value is None:",
        f"            value = self._runtime({name!r}, None)",
    ]


def runner_of(variant):
    """The variant's eager runner (`tdhook_fx.compiler.runner`), made on first use."""
    graph = variant.runner
    if graph is None:
        graph = variant.runner = runner(variant.rewritten.graph_module)
    return graph


def check_batch(td, key, value: torch.Tensor) -> None:
    """`value` can be stored at `key` in `td`: its shape starts with the TensorDict's batch size."""
    batch = tuple(td.batch_size)
    if tuple(value.shape[: len(batch)]) != batch:
        raise TdhookFxError(
            f"{key!r} has shape {tuple(value.shape)}, which does not start with the TensorDict's "
            f"batch size {list(batch)}, so it cannot be stored in it\n"
            "  hint: call with a TensorDict of batch_size=[] or with plain tensors (cm(*inputs))"
        )


def _generate(cm, variant):
    rewritten = variant.rewritten
    in_keys = list(variant.capture.plan.in_keys)
    out_keys = list(variant.capture.plan.out_keys) if rewritten.returns_model_outputs else []
    inputs = [f"x{i}" for i in range(len(in_keys))]
    values = [f"v{i}" for i in range(len(rewritten.runtime_names))]
    env = {
        "Tensor": torch.Tensor,
        "TensorDict": TensorDict,
        "guard": variant.guard,
        "run": runner_of(variant).forward,
        "general": _general,
        "NAMES": frozenset(rewritten.runtime_names),
        "checked": _Checked(variant),
    }
    lines = ["def call(self, args, kwargs):"]  # `make` below returns it, call_td a closure
    lines += [f"    if len(args) != {len(in_keys)}:", "        return general(self, args, kwargs)"]
    lines += [f"    {', '.join(inputs)}, = args"]
    first = inputs[0] if inputs else None
    if first is not None:
        lines += [f"    if type({first}) is not Tensor:"]
        if len(in_keys) == 1:
            lines += [f"        if not kwargs and type({first}) is TensorDict:", f"            return call_td(self, {first})"]
        lines += ["        return general(self, args, kwargs)"]
    lines += ["    if not guard(args):", "        return general(self, args, kwargs)"]
    if values:
        lines += ["    if kwargs:", "        if not kwargs.keys() <= NAMES:", "            return general(self, args, kwargs)"]
    else:
        lines += ["    if kwargs:", "        return general(self, args, kwargs)"]
    for v, name in zip(values, rewritten.runtime_names):
        lines += [f"    value = kwargs.get({name!r}) if kwargs else None", "    if value is not None:"]
        lines += [f"        {v} = self._runtime({name!r}, value)", "    else:"]
        lines += ["    " + line for line in _bound_value(name)] + [f"        {v} = value"]
    lines += [f"    out = run({', '.join(inputs + values)})"]
    result = [f"{key_name(k)!r}: out[{i}]" for i, k in enumerate(out_keys)]
    if rewritten.saved_names:
        saved = ", ".join(f"{name!r}: out[{len(out_keys) + i}]" for i, name in enumerate(rewritten.saved_names))
        result.append(f"{SAVED!r}: {{{saved}}}")
    lines += [f"    return {{{', '.join(result)}}}"]
    lines += _tensordict_call(in_keys, out_keys, rewritten, inputs, values)
    # Both functions are made inside `make`, so they find each other as closures: functions kept
    # in their own globals would be a reference cycle holding the runner (and the model's weights).
    source = "def make():\n" + "\n".join("    " + line for line in lines) + "\n    return call\n"
    exec(compile(source, f"<tdhook_fx call of {type(cm).__name__}>", "exec"), env)  # noqa: S102 - names are repr()'d
    return env.pop("make")()


def _tensordict_call(in_keys, out_keys, rewritten, inputs, values) -> list[str]:
    """`call_td(self, td)`: the same call reading from and writing into a plain TensorDict."""
    lines = ["", "def call_td(self, td):"]
    lines += ["    if td.is_locked or td.device is not None:", "        return general(self, (td,), {})"]
    for x, key in zip(inputs, in_keys):
        read = f"td._get_str({key!r}, None)" if isinstance(key, str) else f"td.get({key!r}, None)"
        lines += [f"    {x} = {read}", f"    if type({x}) is not Tensor:", "        return general(self, (td,), {})"]
    lines += [f"    if not guard(({', '.join(inputs)},)):", "        return general(self, (td,), {})"]
    for v, name in zip(values, rewritten.runtime_names):
        lines += [f"    value = td._get_str({name!r}, None)", "    if value is not None:"]
        lines += ["        if type(value) is not Tensor:", "            return general(self, (td,), {})"]
        lines += [f"        {v} = self._runtime({name!r}, value)", "    else:"]
        lines += ["    " + line for line in _bound_value(name)] + [f"        {v} = value"]
    lines += [f"    out = run({', '.join(inputs + values)})"]
    shapes = [f"{x}.shape" for x in inputs] + [f"getattr({v}, 'shape', None)" for v in values]
    lines += [f"    checked(td, out, (td.batch_size, {', '.join(shapes)}), ({', '.join(inputs)},))"]
    for i, key in enumerate(out_keys):
        if isinstance(key, str):
            lines += [f"    td._set_str({key!r}, out[{i}], inplace=False, validated=True)"]
        else:
            lines += [f"    td.set({key!r}, out[{i}])"]
    if rewritten.saved_names:
        lines += [f"    saved = td._get_str({SAVED!r}, None)", "    if saved is None:"]
        lines += [f"        td._create_nested_str({SAVED!r})", f"        saved = td._get_str({SAVED!r}, None)"]
        lines += ["    elif type(saved) is not TensorDict or saved.is_locked or saved.batch_size != td.batch_size:"]
        for i, name in enumerate(rewritten.saved_names):  # tensordict's own write, and its errors
            lines += [f"        td.set(({SAVED!r}, {name!r}), out[{len(out_keys) + i}])"]
        lines += ["        return td"]
        for i, name in enumerate(rewritten.saved_names):
            lines += [f"    saved._set_str({name!r}, out[{len(out_keys) + i}], inplace=False, validated=True)"]
    lines += ["    return td"]
    return lines


class _Checked:
    """`checked(td, outputs, signature)`: every output starts with the TensorDict's batch size.

    Checked once per signature (batch size, input and runtime value shapes; the last one seen)
    when the graph's output shapes are a function of its input shapes, at every call otherwise.
    """

    def __init__(self, variant):
        self.variant = variant
        self.last = None
        self._lock = threading.Lock()

    def __call__(self, td, outputs, signature, inputs) -> None:
        if signature == self.last:
            return
        rewritten = self.variant.rewritten
        out_keys = self.variant.capture.plan.out_keys if rewritten.returns_model_outputs else ()
        for key, value in zip([*out_keys, *((SAVED, n) for n in rewritten.saved_names)], outputs):
            check_batch(td, key, value)
        if static_shapes(self.variant, inputs):
            with self._lock:
                self.last = signature


def static_shapes(variant, inputs: tuple) -> bool:
    """Whether the variant's output shapes follow from its input shapes alone (no output of a
    data-dependent size, such as `nonzero`'s), worked out once: from the shapes torch.export
    recorded, or by running the captured graph on fake tensors (no computation)."""
    if variant.static_shapes is None:
        variant.static_shapes = _static_shapes(variant.capture.graph_module, inputs)
    return variant.static_shapes


def _static_shapes(graph_module: fx.GraphModule, inputs: tuple) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch._subclasses.fake_tensor import FakeTensorMode

    values = [node.meta.get("val") for node in graph_module.graph.nodes]
    if any(v is not None for v in values):  # exported: each node's fake value is recorded
        return not any(free_unbacked_symbols(v) for v in values if v is not None)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx.Interpreter(graph_module).run(*(mode.from_tensor(x) for x in inputs))
    except Exception:  # noqa: BLE001 - data-dependent shapes (or anything fake tensors cannot run): check every call
        return False
    return True
