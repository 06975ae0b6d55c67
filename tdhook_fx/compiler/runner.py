"""The module that runs a rewritten graph: the same graph, with every attribute path looked up once.

fx prints the call of a nested module as `getattr(self.model, "0")(x)` and a nested parameter
as `getattr(self.transformer.h, "0").attn.c_attn.weight`: each step is a call of
`nn.Module.__getattr__`. On a small model those lookups cost more than the interventions (16
of them for an 8-layer MLP, about 15 us a forward, more than its 8 matrix products take). The
runner is a copy of the rewritten graph whose module calls and attribute reads name the objects
themselves (`self.model_0(x)`), kept in the runner's `__dict__`, where Python finds them with no
function call.

The runner holds the rewritten module's own objects (no weight is copied): in-place changes
(editing a weight, `.to()` on a module's parameters) are seen. Anything that replaces an object
(a buffer moved by `.to()`, `load_state_dict(assign=True)`) needs a new runner; `CompiledModule`
builds one after each.
"""

from __future__ import annotations

import copy
import keyword

from torch import fx

from tdhook_fx.compiler.graphs import detached, fetch_attr, readable
from tdhook_fx.compiler.sources import generated_code


def runner(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A module computing `graph_module`'s forward with its attribute paths resolved."""
    with generated_code([]) as keep:
        keep.append(_runner(graph_module))
    return keep[0]


def _runner(graph_module: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output, old_output = graph.graph_copy(graph_module.graph, {}, return_output_node=True)
    graph.output(output, type_expr=old_output.type)
    graph._codegen = copy.deepcopy(graph_module.graph._codegen)
    module = fx.GraphModule(graph_module, graph)  # containers for the paths; replaced below
    aliases: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and "." in node.target:
            if node.target not in aliases:
                aliases[node.target] = _free_name(readable(node.target), module)
                module.__dict__[aliases[node.target]] = fetch_attr(graph_module, node.target)
            node.target = aliases[node.target]
    graph.lint()
    module.recompile()
    return detached(module)


def _free_name(name: str, module: fx.GraphModule) -> str:
    """`name`, made an identifier no attribute of `module` uses."""
    if not name.isidentifier() or keyword.iskeyword(name):
        name = f"_{name}"
    candidate, n = name, 1
    while hasattr(module, candidate):
        candidate, n = f"{name}_{n}", n + 1
    return candidate
