"""A captured graph as plain JSON values, and back, through an allow-list (no pickle, no code).

`encode(graph_module)` describes each node: its op, name, target, arguments and the node meta
the rewrite passes read (`nn_module_stack`); it returns None for a graph outside the format (a
call of a Python function not on the allow-list, a tensor constant, a shape guard that is not
a comparison of input sizes), which is then simply not stored.

`decode(value, model)` rebuilds the graph on the live `model` (weights are never stored: a
`get_attr`/`call_module` target must exist in the model), refusing (`StoredGraphInvalid`)
anything outside the format: a call target is an aten operator overload looked up by name in
`torch.ops.aten` (never `getattr` on an arbitrary module), a function of `operator`, or the
capture's tap; an argument is a node, a plain constant, a dtype, device, layout or memory
format by name, a slice, or a list or tuple of those. What the graph computes is not checked
here: the caller compares it with the eager model on the example.
"""

from __future__ import annotations

import math
import operator
import re

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture.shape_guards import GUARDS_MODULE, ShapeGuards, checked
from tdhook_fx.compiler.capture.taps import TAP
from tdhook_fx.errors import StoredGraphInvalid

OPS = ("placeholder", "get_attr", "call_function", "call_module", "output")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
PART = r"(?!__)[A-Za-z0-9_]{1,255}"  # a module or tensor name: no dunder (it would reach Python internals)
DOTTED = re.compile(rf"{PART}(?:\.{PART}){{0,63}}")
MAX_NODES = 200_000
MAX_TEXT = 1 << 14

OPERATOR_FUNCTIONS = {  # the Python functions an exported graph calls (on tuples and sizes)
    f.__name__: f
    for f in (
        operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
        operator.mod, operator.pow, operator.neg, operator.eq, operator.ne, operator.lt, operator.le,
        operator.gt, operator.ge,
    )
}
DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}
NAMED = {"dtype": (torch.dtype, DTYPES), "layout": (torch.layout, LAYOUTS), "memory_format": (torch.memory_format, MEMORY_FORMATS)}
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:(0|[1-9][0-9]{0,3}))?")


# ---- encoding -------------------------------------------------------------------------------------


class _Unstorable(Exception):
    """Internal: the graph has something the format cannot describe."""


def encode(graph_module: fx.GraphModule, guards: list | None) -> dict | None:
    """The graph as JSON values, or None if it holds anything outside the format."""
    try:
        nodes = [_encode_node(node, graph_module, guards) for node in graph_module.graph.nodes]
    except _Unstorable:
        return None
    return {"nodes": nodes, "guards": guards or []}


def _encode_node(node: fx.Node, graph_module: fx.GraphModule, guards) -> dict:
    if node.op not in OPS:
        raise _Unstorable(node.op)
    if node.op == "call_function":
        target = _function_name(node.target)
    elif node.op == "call_module" and node.target == GUARDS_MODULE:
        if guards is None:
            raise _Unstorable("shape guards not known")
        target = GUARDS_MODULE
    elif node.op in ("get_attr", "call_module"):
        if not node.target.startswith("model."):  # a constant of the graph's own: not stored
            raise _Unstorable(node.target)
        target = node.target
    else:
        target = node.target
    stack = node.meta.get("nn_module_stack")
    encoded = {"op": node.op, "name": node.name, "target": target, "args": _value(node.args), "kwargs": _value(dict(node.kwargs))}
    if stack:
        encoded["stack"] = [[key, path, str(kind)] for key, (path, kind) in stack.items()]
    return encoded


def _function_name(target) -> str:
    if target is TAP:
        return "tap"
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    if OPERATOR_FUNCTIONS.get(getattr(target, "__name__", None)) is target:
        return f"operator.{target.__name__}"
    raise _Unstorable(str(target))


def _value(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_value(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_value(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _value(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_value(value.start), _value(value.stop), _value(value.step)]}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, (cls, _) in NAMED.items():
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    raise _Unstorable(type(value).__name__)


# ---- decoding -------------------------------------------------------------------------------------


def decode(value, model: nn.Module) -> fx.GraphModule:
    """The graph `value` describes, on the live `model` (its tensors, not copies)."""
    if not isinstance(value, dict) or set(value) != {"nodes", "guards"}:
        raise StoredGraphInvalid("not a stored graph")
    nodes, guards = value["nodes"], value["guards"]
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        raise StoredGraphInvalid("no node list")
    graph = fx.Graph()
    made: dict[str, fx.Node] = {}
    for i, stored in enumerate(nodes):
        _decode_node(graph, stored, made, model, f"node {i}")
    if list(graph.nodes)[-1].op != "output":
        raise StoredGraphInvalid("the graph does not end with its output")
    root = nn.Module()
    root.add_module("model", model)
    names = tuple(node.name for node in graph.nodes if node.op == "placeholder")
    root.add_module(GUARDS_MODULE, ShapeGuards(checked(guards, names), names))
    graph.lint()
    return fx.GraphModule(root, graph)


def _decode_node(graph: fx.Graph, stored, made: dict, model: nn.Module, where: str) -> None:
    if not isinstance(stored, dict) or not {"op", "name", "target", "args", "kwargs"} <= set(stored) <= {
        "op", "name", "target", "args", "kwargs", "stack"
    }:
        raise StoredGraphInvalid(f"{where}: not a node")
    op, name = stored["op"], stored["name"]
    if op not in OPS or not _text(name, IDENTIFIER) or name in made:
        raise StoredGraphInvalid(f"{where}: bad op or name")
    target = _target(op, stored["target"], model, where)
    args = _argument(stored["args"], made, where)
    kwargs = _argument(stored["kwargs"], made, where)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise StoredGraphInvalid(f"{where}: arguments are not a tuple and a dict")
    node = graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:
        raise StoredGraphInvalid(f"{where}: name {name!r} is taken")
    if "stack" in stored:
        node.meta["nn_module_stack"] = _stack(stored["stack"], where)
    made[name] = node


def _target(op: str, target, model: nn.Module, where: str):
    if op == "placeholder":
        if not _text(target, IDENTIFIER):
            raise StoredGraphInvalid(f"{where}: bad placeholder")
        return target
    if op == "output":
        if target != "output":
            raise StoredGraphInvalid(f"{where}: bad output")
        return target
    if op == "call_function":
        return _function(target, where)
    if op == "call_module" and target == GUARDS_MODULE:
        return target
    if not _text(target, DOTTED) or not target.startswith("model."):
        raise StoredGraphInvalid(f"{where}: bad attribute path")
    path = target.removeprefix("model.")
    owner_path, _, attribute = path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if op == "get_attr" else model.get_submodule(path)
    except AttributeError:
        raise StoredGraphInvalid(f"{where}: {target} is not in the model") from None
    if op == "get_attr" and attribute not in owner._parameters and attribute not in owner._buffers:
        raise StoredGraphInvalid(f"{where}: {target} is not a parameter or buffer of the model")
    return target


def _function(name, where: str):
    if name == "tap":
        return TAP
    if isinstance(name, str) and name.startswith("operator.") and name[9:] in OPERATOR_FUNCTIONS:
        return OPERATOR_FUNCTIONS[name[9:]]
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 3 and parts[0] == "aten" and all(_text(p, IDENTIFIER) for p in parts[1:]):
        packet = _aten_packet(parts[1])
        if packet is not None and parts[2] in packet.overloads():
            return getattr(packet, parts[2])
    raise StoredGraphInvalid(f"{where}: call target {str(name)[:80]!r} is not allowed")


def _aten_packet(name: str):
    """The aten operator `name` (an OpOverloadPacket) if torch has one, else None. The lookup in
    torch's operator namespace returns the packet torch caches (operators compare by identity);
    a name of a Python attribute of the namespace is refused by the type check."""
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else None


def _argument(value, made: dict, where: str, depth: int = 0):
    if depth > 32:
        raise StoredGraphInvalid(f"{where}: arguments nested too deeply")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise StoredGraphInvalid(f"{where}: a string too long")
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise StoredGraphInvalid(f"{where}: bad argument")
    (kind, inner), = value.items()
    if kind == "node":
        if inner not in made:
            raise StoredGraphInvalid(f"{where}: reads a node not defined before it")
        return made[inner]
    if kind in ("tuple", "list") and isinstance(inner, list):
        items = [_argument(v, made, where, depth + 1) for v in inner]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(inner, dict):
        return {k: _argument(v, made, where, depth + 1) for k, v in inner.items()}
    if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
        return slice(*(_argument(v, made, where, depth + 1) for v in inner))
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if kind == "device" and _text(inner, DEVICE):
        return torch.device(inner)
    if kind in NAMED and inner in NAMED[kind][1]:
        return NAMED[kind][1][inner]
    raise StoredGraphInvalid(f"{where}: bad argument of kind {str(kind)[:40]!r}")


def _stack(value, where: str) -> dict:
    if not isinstance(value, list) or len(value) > 256:
        raise StoredGraphInvalid(f"{where}: bad module stack")
    stack = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(e, str) and len(e) <= MAX_TEXT for e in entry)):
            raise StoredGraphInvalid(f"{where}: bad module stack entry")
        stack[entry[0]] = (entry[1], entry[2])
    return stack


def _text(value, pattern: re.Pattern) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None
