"""Make the sites inside modules that a program touches addressable: a tap on each.

Runs on the copy of the captured graph before any statement pass, so the passes find an
internal site as they find every other one (`RewriteContext.current`), and the taps go at the
end as all taps do. An operation's value gets a tap right after its node. An attention site
(`q`, `k`, `v`, `scores`, `pattern`) gets one where its SDPA call reads or would compute it:
q, k and v as the call's inputs (key and value heads repeated per query head under
grouped-query attention); scores and pattern by replacing that one call by its math
(`tdhook_fx.compiler.attention`). Other SDPA calls stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from tdhook_fx.compiler import attention
from tdhook_fx.compiler.capture.sites import SiteInfo
from tdhook_fx.compiler.capture.taps import TAP
from tdhook_fx.errors import TdhookFxError


def expose_internal_sites(graph: fx.Graph, sites: list[SiteInfo]) -> None:
    """Tap every internal site of `sites` in `graph` (a copy of the captured graph), in place."""
    nodes = {node.name: node for node in graph.nodes}
    touched: dict[str, dict[str, SiteInfo]] = {}  # SDPA node -> its touched attention sites
    for site in sites:
        if site.attention is not None:
            touched.setdefault(site.node, {})[site.attention] = site
    for name, chosen in touched.items():
        nodes[name] = _expose_attention(graph, _node(nodes, name), chosen)
    for site in sites:
        if site.attention is None:
            _tap_after(graph, _node(nodes, site.node), site.name)


def internal_sites(interventions) -> list[SiteInfo]:
    """The internal sites the interventions touch, each once, in program order."""
    found = {i.site.name: i.site for i in interventions if i.site.kind == "op"}
    return list(found.values())


def _node(nodes: dict, name: str) -> fx.Node:
    if name not in nodes:  # the site table and the graph come from one capture: a bug if not
        raise TdhookFxError(f"internal error: the captured graph has no node {name!r}")
    return nodes[name]


def _tap_after(graph: fx.Graph, node: fx.Node, site: str) -> fx.Node:
    with graph.inserting_after(node):
        tap = graph.call_function(TAP, (node, site))
    node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
    return tap


def _expose_attention(graph: fx.Graph, call: fx.Node, touched: dict[str, SiteInfo]) -> fx.Node:
    """Taps at the touched attention sites of one SDPA call; returns the node of its output."""
    arguments = attention.sdpa_arguments(call.args, call.kwargs)
    q, k, v = arguments["query"], arguments["key"], arguments["value"]
    math = "scores" in touched or "pattern" in touched
    made: list[fx.Node] = []

    def add(target, *args, **kwargs) -> fx.Node:
        node = graph.call_function(target, args, kwargs)
        made.append(node)
        return node

    def tapped(node, name: str):
        return add(TAP, node, touched[name].name) if name in touched else node

    repeated = arguments["enable_gqa"] and (math or "k" in touched or "v" in touched)
    with graph.inserting_before(call):
        if repeated:
            k, v = add(attention.repeat_heads, k, q), add(attention.repeat_heads, v, q)
        q, k, v = tapped(q, "q"), tapped(k, "k"), tapped(v, "v")
        if math:
            products = add(attention.scaled_products, q, k, arguments["scale"])
            scores = tapped(add(attention.masked, products, arguments["attn_mask"], arguments["is_causal"]), "scores")
            pattern = tapped(add(attention.softmax, scores, q), "pattern")
            if arguments["dropout_p"]:
                pattern = add(F.dropout, pattern, arguments["dropout_p"], training=True)
            output = add(torch.matmul, pattern, v)
    for node in made:
        node.meta.update((key, call.meta[key]) for key in ("nn_module_stack", "stack_trace") if key in call.meta)
    if math:
        call.replace_all_uses_with(output)
        graph.erase_node(call)
        return output
    new = {"query": q, "key": k, "value": v}
    if repeated:
        new["enable_gqa"] = False  # the heads are repeated already
    call.args = tuple(new.pop(name, a) for name, a in zip(attention.PARAMETERS, call.args))
    call.kwargs = {**call.kwargs, **new}
    return call
