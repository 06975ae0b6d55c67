"""patch SITE[INDEX] [from SOURCE]: take the site's value from a run on the source inputs.

One fused graph: the source run is a copy of the captured graph's nodes that the patched sites
need (their ancestors, and in a graph with in-place ops every node up to the last patched site), fed by new inputs
`SOURCE_<input>` (tdhook's ("patched", key) by default), computed before the target run.
"""

from __future__ import annotations

from torch import fx

from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import needed_nodes, readable
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.compiler.resolve import DEFAULT_PATCH_SOURCE


def insert_patch(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site.name
    source = intervention.statement.source or DEFAULT_PATCH_SOURCE
    patched = _source_values(ctx, source)[site]
    old = ctx.current[site]
    index = ctx.index(intervention.index)
    with ctx.after_value(site), ctx.new_nodes() as made:
        where = ctx.where(intervention)
        region = old if index is None else ctx.region(old, index, where=where)
        value = patched if index is None else ctx.region(patched, index, where=where)
        function = intervention.statement.function
        if function is not None:
            value = ctx.call(ops.call, ctx.runtime[function.name], region, value, name=function.name)
        value = ctx.call(ops.fit, value, region, intervention.describe(), site, name=f"{source}_{site}")
        new = value if index is None else ctx.call(ops.assign, old, index, value, *where, name=f"patch_{site}")
    ctx.replace(site, new, made)


def _source_values(ctx: RewriteContext, source: str) -> dict[str, fx.Node]:
    """The source run's value of every site patched from `source` (built on first use)."""
    if source in ctx.source_values:
        return ctx.source_values[source]
    wanted = {
        i.site.name
        for i in ctx.resolved.interventions
        if i.kind == "patch" and (i.statement.source or DEFAULT_PATCH_SOURCE) == source
    }
    pristine = ctx.capture.graph_module.graph
    taps = {n.args[1]: n for n in pristine.nodes if is_tap(n)}
    # in a graph with in-place ops, every node up to the last patched site (an in-place op may
    # change a value without being an ancestor of the site's node)
    last = [n for n in pristine.nodes if is_tap(n) and n.args[1] in wanted][-1] if ctx.capture.mutates else None
    needed = needed_nodes(pristine, [taps[s] for s in wanted], up_to=last)
    inputs = [n for n in pristine.nodes if n.op == "placeholder"]
    env: dict[fx.Node, fx.Node] = {}
    for original, main in zip(inputs, ctx.inputs):
        env[original] = ctx.add_input(f"{source}_{main.name}")
    ctx.source_inputs[source] = [env[n] for n in inputs]
    first_compute = next(n for n in ctx.graph.nodes if n.op not in ("placeholder", "get_attr"))
    kept: dict[str, fx.Node] = {}  # site -> a copy of its value, where later source ops change it in place
    with ctx.graph.inserting_before(first_compute):
        for node in pristine.nodes:
            if node not in needed or node.op == "placeholder":
                continue
            if is_tap(node):
                env[node] = env[node.args[0]]
                if node.args[1] in wanted and ctx.capture.mutates:
                    kept[node.args[1]] = ctx.method("clone", env[node], name=f"{source}_{node.args[1]}_value")
                    ctx.source_nodes.add(kept[node.args[1]])
                continue
            env[node] = ctx.graph.node_copy(node, lambda n: env[n])
            env[node]._rename(readable(f"{source}_{node.name}"))
            ctx.source_nodes.add(env[node])
    ctx.source_values[source] = {s: kept.get(s, env[taps[s]]) for s in wanted}
    return ctx.source_values[source]

