"""What a captured graph depends on in the model, as a cache key and as a check run before each call.

A capture is valid for the model as it was: the same module objects at the same paths (its
structure), each module's mode (`training`), the same parameter and buffer objects with the
same dtypes, devices and shapes, and inputs of the same dtypes, devices and ranks.

- `state_key(model, inputs)` lists all of it: the key of the capture cache, so a capture is
  never reused for a model that changed (`.half()` keeps the parameter objects and changes
  their dtype). Tensors are named in it by their path, dtype, device, shape and which other
  path holds the same tensor (tied weights), not by object: `.to()` replaces every floating
  buffer and `load_state_dict(assign=True)` every parameter, with tensors a capture can read as
  well as the old ones (`rebind` points a graph at the model's tensors of now).
- `guard(model, ...)` is the same check (and that no module got a hook since, see `user_hooks`), generated as Python code (a chain of `is` tests, about
  20 ns each), that a compiled module runs before every call to know that its graph still fits
  the model. How much it checks depends on the graph (see `Follows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tdhook_fx.compiler.capture.user_hooks import global_hook_dicts, hook_dicts


def state_key(model: nn.Module, inputs: tuple) -> tuple:
    """Everything a capture of `model` on inputs like `inputs` depends on (hashable)."""
    modules = tuple((name, id(m), type(m), m.training) for name, m in model.named_modules(remove_duplicate=False))
    first_name: dict[int, str] = {}
    tensors = []
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        tensors.append((name, first_name.setdefault(id(t), name), t.dtype, t.device, tuple(t.shape)))
    return modules, tuple(tensors), input_key(inputs)


def input_key(inputs: tuple) -> tuple:
    """What a capture depends on in its inputs: each one's dtype, device and rank (sizes are dynamic)."""
    return tuple((x.dtype, x.device, x.dim()) for x in inputs)


def held_objects(model: nn.Module) -> tuple:
    """The objects `state_key` names by `id()` (the modules), to be kept alive with the key (an id
    is unique only while its object lives). Not the model itself: caches are keyed by it weakly."""
    return tuple(m for m in model.modules() if m is not model)


def rebind(graph_module: torch.fx.GraphModule, model: nn.Module, prefix: str = "model.") -> bool:
    """Point `graph_module`'s reads of model tensors (`get_attr model.x.weight`) at the tensors
    `model` holds at those paths now; returns whether any changed. The graph must have been
    captured from `model` in a state with the same `state_key`."""
    changed = False
    for node in graph_module.graph.nodes:
        if node.op != "get_attr" or not node.target.startswith(prefix):
            continue
        path, _, name = node.target.partition(".")[2].rpartition(".")
        owner = model.get_submodule(path)
        current = owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)
        holder = graph_module.get_submodule(node.target.rpartition(".")[0])
        if current is None or getattr(holder, name) is current:
            continue
        kind = "_parameters" if isinstance(current, nn.Parameter) else "_buffers"
        getattr(holder, "_parameters").pop(name, None)
        getattr(holder, "_buffers").pop(name, None)
        holder.__dict__.pop(name, None)
        getattr(holder, kind)[name] = current
        changed = True
    return changed


@dataclass(frozen=True)
class Follows:
    """What a graph follows by itself, so that its guard need not check it.

    A graph traced by fx calls the model's own modules and replays its Python code: it follows
    changes of dtype and device (`tensors=False`: only the objects it reads directly are
    checked). An exported graph is made of aten calls with dtypes, devices and shapes baked in
    (`_assert_tensor_metadata(dtype=float32)`, `arange(device=cpu)`): every parameter and buffer
    and every input is checked (`tensors=True`).
    """

    tensors: bool  # check the dtype, device and shape of every parameter and buffer, and the inputs
    read: frozenset[str] = frozenset()  # tensors the graph reads directly (by qualified name): checked by identity
    live_modes: frozenset[str] = frozenset()  # modules the graph calls whole: they read their own mode


def guard(model: nn.Module, follows: Follows, inputs: tuple) -> Callable[[tuple], bool]:
    """`check(inputs) -> bool`: whether `model` (and `inputs`) are still as they are now, as far
    as a graph that `follows` so much cares. Generated code; it holds the model's modules but not
    the model itself (only its instance dict), so caches keyed by the model weakly still free it."""
    code = _GuardCode()
    root = code.bind(model.__dict__)
    code.term(f"{root}['training'] is {model.training}")
    code.no_hooks(model)
    code.term(f"not ({' or '.join(code.bind(d) for d in global_hook_dicts())})")
    seen: set[int] = set()
    _check_module(code, model, f"{root}['_modules']", f"{root}['_parameters']", f"{root}['_buffers']", "", follows, seen)
    if follows.tensors:
        for i, x in enumerate(inputs):
            code.term(f"inputs[{i}].dtype is {code.bind(x.dtype)}")
            code.term(f"inputs[{i}].device == {code.bind(x.device)}")
            code.term(f"inputs[{i}].dim() == {x.dim()}")
        code.term(f"len(inputs) == {len(inputs)}")
    return code.function()


def _check_module(code, module: nn.Module, modules: str, parameters: str, buffers: str, prefix: str, follows, seen) -> None:
    seen.add(id(module))
    for kind, holder in (("_parameters", parameters), ("_buffers", buffers)):
        for name, tensor in getattr(module, kind).items():
            qualified = prefix + name
            if not follows.tensors and qualified not in follows.read:
                continue
            if tensor is None:
                code.term(f"{holder}.get({name!r}) is None")
                continue
            value = code.bind(tensor)
            code.term(f"{holder}.get({name!r}) is {value}")
            if follows.tensors:
                code.term(f"{value}.dtype is {code.bind(tensor.dtype)}")
                code.term(f"{value}.device == {code.bind(tensor.device)}")
                code.term(f"{value}.shape == {tuple(tensor.shape)}")
    for name, child in module._modules.items():
        if child is None:
            code.term(f"{modules}.get({name!r}) is None")
            continue
        value = code.bind(child)
        code.term(f"{modules}.get({name!r}) is {value}")
        if prefix + name not in follows.live_modes:
            code.term(f"{value}.training is {child.training}")
        if id(child) not in seen:
            code.no_hooks(child)
            _check_module(
                code, child, code.bind(child._modules), code.bind(child._parameters), code.bind(child._buffers),
                f"{prefix}{name}.", follows, seen,
            )


class _GuardCode:
    def __init__(self):
        self.namespace: dict[str, object] = {}
        self.terms: list[str] = []

    def bind(self, value) -> str:
        name = f"_{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def term(self, text: str) -> None:
        self.terms.append(text)

    def no_hooks(self, module: nn.Module) -> None:
        """`module` still has no hooks (one registered after compiling would not run: the call
        fails the guard, and the capture for the new state refuses the hook)."""
        self.term(f"not ({' or '.join(self.bind(d) for d in hook_dicts(module))})")

    def function(self) -> Callable[[tuple], bool]:
        body = " and ".join(self.terms) or "True"
        source = f"def check(inputs):\n    return {body}\n"
        exec(compile(source, "<tdhook_fx guard>", "exec"), self.namespace)  # noqa: S102 - our own code, no user text
        return self.namespace.pop("check")  # kept in its own globals, it would be a reference cycle


def read_tensors(graph_module: torch.fx.GraphModule, prefix: str = "model.") -> frozenset[str]:
    """The model tensors a graph reads directly (`get_attr model.x.weight` -> "x.weight")."""
    return _targets(graph_module, "get_attr", prefix)


def called_modules(graph_module: torch.fx.GraphModule, prefix: str = "model.") -> frozenset[str]:
    """The model's modules a graph calls whole (`call_module model.x` -> "x")."""
    return _targets(graph_module, "call_module", prefix)


def _targets(graph_module: torch.fx.GraphModule, op: str, prefix: str) -> frozenset[str]:
    return frozenset(
        node.target.removeprefix(prefix)
        for node in graph_module.graph.nodes
        if node.op == op and node.target.startswith(prefix)
    )


def bakes_tensor_facts(nodes: Iterable[torch.fx.Node]) -> bool:
    """Whether any node holds a dtype, a device or a tensor constant in its arguments (a graph
    traced by fx has them where the model's code computed them from a concrete tensor)."""
    found = False

    def visit(value):
        nonlocal found
        if isinstance(value, (torch.dtype, torch.device, torch.Tensor)):
            found = True
        return value

    for node in nodes:
        torch.fx.node.map_aggregate((node.args, node.kwargs), visit)
        if found:
            return True
    return False
