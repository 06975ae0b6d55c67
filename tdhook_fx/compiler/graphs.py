"""Small facts about fx graphs that several stages need."""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

_SIDE_EFFECTS = fx.node._side_effectful_functions  # asserts, profiler marks, shape checks
_IN_PLACE = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def natural_order(name: str) -> list:
    """A sort key that puts numbered names in numeric order: h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def readable(text: str) -> str:
    """A node name that explains itself: 'steer', 'transformer.h.2.mlp' -> steer_transformer_h_2_mlp."""
    return re.sub(r"\W+", "_", text).strip("_")


def ancestors(nodes) -> set[fx.Node]:
    """`nodes` and every node they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def needed_nodes(graph: fx.Graph, targets, up_to: fx.Node | None = None) -> set[fx.Node]:
    """The nodes that compute `targets`: their ancestors and, with `up_to` (for a graph with
    in-place ops, which may matter without being an ancestor of anything), every node up to it."""
    needed = ancestors(targets)
    if up_to is not None:
        for node in graph.nodes:
            needed.add(node)
            if node is up_to:
                break
    return needed


def detached(graph_module: fx.GraphModule) -> fx.GraphModule:
    """`graph_module`, with its graph no longer pointing back at it.

    fx keeps `graph.owning_module`, a reference cycle (module -> graph -> module) that only the
    cycle collector frees, and with it every weight the module holds: a dropped model would stay
    in memory until the next collection. Call it once the graph is final (fx's checks that need
    the owner, such as linting attribute targets, are done by then)."""
    graph_module.graph.owning_module = None
    return graph_module


def fetch_attr(root: torch.nn.Module, target: str):
    """The attribute at dotted `target` under `root` (None if there is none)."""
    value = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def mutates(node: fx.Node, root: torch.nn.Module | None = None) -> bool:
    """Whether `node` may change a tensor in place (fx-traced code can; exported graphs do not).

    `root` (the graph's module) lets whole-module calls be checked (`nn.ReLU(inplace=True)`).
    """
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return root is not None and getattr(fetch_attr(root, node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        if node.target in _IN_PLACE:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return schema.is_mutable
        return getattr(node.target, "__name__", "").endswith("_")
    return False


def is_impure(node: fx.Node, root: torch.nn.Module) -> bool:
    """For dead code elimination: whether `node` has effects beyond its value.

    Unlike fx's default, a random op (dropout) whose value nobody uses may go: cutting the
    graph after a `stop` must not keep the rest of the model alive for its RNG draws.
    """
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        module = fetch_attr(root, node.target)
        builtin = type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))
        updates_statistics = module.training and any(True for _ in module.buffers(recurse=False))
        return not builtin or updates_statistics or mutates(node, root)
    if node.op == "call_function" and node.target in _SIDE_EFFECTS:
        return True
    return mutates(node, root)
