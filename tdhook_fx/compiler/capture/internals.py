"""Sites inside modules: the values a module's own forward computes, named by the operation.

Both front ends record, on every node, the stack of module calls it was traced in
(`nn_module_stack`, the n-th call of a module keyed `name@n`). A node whose innermost module
call is `M@c` is a value of M's own code (not of a child's): it becomes the site
`M@c:OP_N`, the N-th `OP` of that call (`transformer.h.0:add_1`, `attn:view_0`). The names
depend only on the module's code, so they are the same for every layer and every input.

Each fused attention call (`scaled_dot_product_attention`) adds the sites `q`, `k`, `v`,
`scores` and `pattern` (`tdhook_fx.compiler.attention`), a second one in the same call
`q_1`, `k_1`, ...
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
    return found


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
