"""Sites inside modules: the values a module's own forward computes, named by the operation.

Both front ends record, on every node, the stack of module calls it was traced in
(`nn_module_stack`, the n-th call of a module keyed `name@n`). A node whose innermost module
call is `M@c` is a value of M's own code (not of a child's): it becomes the site
`M@c:OP_N`, the N-th `OP` of that call (`transformer.h.0:add_1`, `attn:view_0`). The names
depend only on the module's code, so they are the same for every layer and every input.

Each fused attention call (`scaled_dot_product_attention`) adds the sites `q`, `k`, `v`,
`scores` and `pattern` (`tdhook_fx.compiler.attention`), a second one in the same call
`q_1`, `k_1`, ... A module call whose own code does attention step by step (eager attention:
`matmul(q, k^T)`, ..., `softmax`, ..., `matmul(pattern, v)`) gets the same names for those
values: `q` and `k` the first product's operands (`k` before its transpose), `scores` the
softmax's input, `pattern` the second product's left operand without its dropout (the softmax
after its cast to the queries' dtype), `v` its right operand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from tdhook_fx.compiler.attention import ATTENTION_SITES, is_sdpa
from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import mutates

# The attribute of `ModelCall` that holds the user's model: stack names start with it.
_MODEL = "model"
_NOT_VALUES = ("sym_size", "sym_numel", "sym_stride", "_assert", "getattr")


@dataclass(frozen=True)
class InternalOp:
    """One value computed inside a module call, and the node that computes it."""

    module: str
    call: int
    name: str  # "add_0", or an attention site: "pattern"
    node: str  # the captured graph's node
    operation: str  # what computes it, for people: "aten.add.Tensor", "attention pattern"
    attention: str | None = None  # for an attention site: which one ("q" ... "pattern")

    @property
    def site(self) -> str:
        return f"{self.module}{f'@{self.call}' if self.call else ''}:{self.name}"


def internal_ops(graph_module: fx.GraphModule) -> list[InternalOp]:
    """Every operation node of the model's own code, with the module call it belongs to, in
    graph order. Which of them hold one tensor is for the caller to check (on a run)."""
    found: list[InternalOp] = []
    counts: dict[tuple, int] = {}
    own: dict[tuple, list[tuple[fx.Node, str]]] = {}  # module call -> its (node, operation), in order
    for node in graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method") or is_tap(node) or mutates(node, graph_module):
            continue
        owner = module_call(node)
        if owner is None or not owner[0]:  # the root's own code: no path names it
            continue
        if is_sdpa(node):
            number = counts.get((*owner, "attention"), 0)
            counts[(*owner, "attention")] = number + 1
            suffix = f"_{number}" if number else ""
            for site in ATTENTION_SITES:
                found.append(InternalOp(*owner, site + suffix, node.name, f"attention {site}", site))
        operation = operation_name(node)
        if operation.startswith(_NOT_VALUES):
            continue
        number = counts.get((*owner, operation), 0)
        counts[(*owner, operation)] = number + 1
        found.append(InternalOp(*owner, f"{operation}_{number}", node.name, _describe(node)))
        own.setdefault(owner, []).append((node, operation))
    for owner, nodes in own.items():
        if not any(op.attention is not None for op in found if (op.module, op.call) == owner):
            found.extend(_eager_attention(owner, nodes))
    return found


_PATTERN_STEPS = ("dropout", "native_dropout", "to", "type", "_to_copy", "contiguous")


def _eager_attention(owner: tuple[str, int], nodes: list[tuple[fx.Node, str]]) -> list[InternalOp]:
    """The attention sites of a module call that computes attention step by step: for each
    softmax, the last product before it that it depends on and the first product after it
    that reads it (through a cast or dropout)."""
    found: list[InternalOp] = []
    for i, (softmax, operation) in enumerate(nodes):
        if operation not in ("softmax", "_softmax") or not isinstance(softmax.args[0], fx.Node):
            continue
        first = next((n for n, o in reversed(nodes[:i]) if o == "matmul" and _reaches(n, softmax)), None)
        second = next((n for n, o in nodes[i + 1 :] if o == "matmul" and _from_pattern(n.args[0], softmax)), None)
        if first is None or second is None or not all(isinstance(a, fx.Node) for a in (*first.args[:2], *second.args[:2])):
            continue
        key = first.args[1]
        if operation_name(key) in ("transpose", "t") and isinstance(key.args[0], fx.Node):
            key = key.args[0]
        else:
            continue  # a key that is not transposed here: no (batch, heads, seq, head_dim) value to name
        pattern = second.args[0]
        while operation_name(pattern) in ("dropout", "native_dropout") and isinstance(pattern.args[0], fx.Node):
            pattern = pattern.args[0]
        suffix = f"_{len(found) // 5}" if found else ""
        for name, node in (("q", first.args[0]), ("k", key), ("v", second.args[1]), ("scores", softmax.args[0]), ("pattern", pattern)):
            found.append(InternalOp(*owner, name + suffix, node.name, f"eager attention {name} ({_describe(node)})"))
    return found


def _reaches(node: fx.Node, target: fx.Node, limit: int = 8) -> bool:
    """Whether `target` is computed from `node` within `limit` steps (scale, mask, cast)."""
    frontier = [target]
    for _ in range(limit):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        if node in frontier:
            return True
    return False


def _from_pattern(value, softmax: fx.Node) -> bool:
    """Whether `value` is the softmax's output, after casts and dropout only."""
    while isinstance(value, fx.Node):
        if value is softmax:
            return True
        if operation_name(value) not in _PATTERN_STEPS:
            return False
        value = value.args[0]
    return False


def module_call(node: fx.Node) -> tuple[str, int] | None:
    """(module name, call index) of the innermost module call `node` was traced in, None for
    the code around the model."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (qualified, _type) = list(stack.items())[-1]
    if qualified != _MODEL and not qualified.startswith(_MODEL + "."):
        return None
    module = qualified[len(_MODEL) + 1 :]
    call = re.search(r"@(\d+)$", key)
    return module, int(call.group(1)) if call else 0


def operation_name(node: fx.Node) -> str:
    """A short name for what `node` computes: `add` for aten.add.Tensor, operator.add, `x + y`."""
    target = node.target
    if node.op == "call_method":
        name = target
    elif hasattr(target, "_opname"):  # an aten operator overload
        name = target._opname
    else:
        name = getattr(target, "__name__", type(target).__name__)
    return re.sub(r"\W+", "_", name).strip("_") or "op"


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"Tensor.{target}"
    return str(target) if hasattr(target, "_opname") else getattr(target, "__qualname__", str(target))
