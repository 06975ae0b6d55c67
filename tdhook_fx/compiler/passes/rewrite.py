"""Rewrite: captured graph + resolved program -> the rewritten graph module.

Each statement kind has one small pass (a plain function over the `RewriteContext`); they run
statement by statement in program order, so statements at one site apply in the order written.
The graph is finished once at the end (outputs, taps removed, dead code eliminated, linted,
recompiled): recompiling after every statement would cost more than the whole rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from tdhook_fx.compiler.capture import Capture
from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import detached, fetch_attr, is_impure, readable
from tdhook_fx.compiler.ir import ResolvedProgram
from tdhook_fx.compiler.passes.grad import insert_save_grad, insert_set_grad, move_grad_inputs_last
from tdhook_fx.compiler.passes.meta import INSERTED, SITE
from tdhook_fx.compiler.passes.parameters import insert_parameter_edit
from tdhook_fx.compiler.passes.patch import insert_patch
from tdhook_fx.compiler.passes.prune import insert_prune
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.compiler.passes.rule import insert_rule
from tdhook_fx.compiler.passes.save import insert_save
from tdhook_fx.compiler.passes.set_value import insert_set
from tdhook_fx.compiler.passes.steer import insert_steer
from tdhook_fx.compiler.passes.stop import insert_stop
from tdhook_fx.compiler.sources import generated_code

PASSES = {
    "save": insert_save,
    "set": insert_set,
    "steer": insert_steer,
    "patch": insert_patch,
    "prune": insert_prune,
    "stop": insert_stop,
    "save_grad": insert_save_grad,
    "set_grad": insert_set_grad,
    "rule": insert_rule,
}
PARAMETER_PASSES = {"set": insert_parameter_edit, "steer": insert_parameter_edit}  # on a parameter site


@dataclass(frozen=True)
class Rewritten:
    graph_module: fx.GraphModule
    # the graph's inputs, in order: model inputs, runtime values, patch sources, `save grad` deltas
    runtime_names: tuple[str, ...]
    source_inputs: tuple[tuple[str, int], ...]  # (source, in_key position) per source input
    returns_model_outputs: bool
    saved_names: tuple[str, ...]
    grad_names: tuple[str, ...] = ()  # one zero input per `save grad`; its gradient is the saved one


def rewrite(
    capture: Capture, resolved: ResolvedProgram, outputs: Callable[[RewriteContext], dict[str, fx.Node]] | None = None
) -> Rewritten:
    """The program's passes in order; then `outputs(ctx)`, if given, adds nodes of its own and
    names the values to return with the saved ones (e.g. the logit lens's readouts)."""
    ctx = RewriteContext(capture, resolved)
    for intervention in resolved.interventions:
        on_parameter = intervention.site.kind == "param" and intervention.kind in PARAMETER_PASSES
        (PARAMETER_PASSES if on_parameter else PASSES)[intervention.kind](ctx, intervention)
    return _finish(ctx, outputs(ctx) if outputs is not None else {})


def _finish(ctx: RewriteContext, extra: dict[str, fx.Node]) -> Rewritten:
    graph = ctx.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    model_outputs = () if ctx.stopped else tuple(output.args[0])
    saved = {name: ctx.saved[name] for name in ctx.resolved.saved_names} | extra
    saved_names = tuple(saved)
    values = model_outputs + tuple(saved.values())
    graph.erase_node(output)
    graph.output(values)
    _tag_inserted(graph, ctx)
    _remove_taps(graph, ctx.original)
    grad_names = move_grad_inputs_last(graph)
    graph.eliminate_dead_code(is_impure_node=lambda node: is_impure(node, ctx.capture.graph_module))
    graph.lint()
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            own = node.target in ctx.attributes
            root[node.target] = ctx.attributes[node.target] if own else fetch_attr(ctx.capture.graph_module, node.target)
    with generated_code([]) as keep:
        graph_module = detached(fx.GraphModule(root, graph, class_name="Rewritten"))
        keep.append(graph_module)
    sources = tuple((source, i) for source, nodes in ctx.source_inputs.items() for i in range(len(nodes)))
    return Rewritten(graph_module, tuple(ctx.runtime), sources, not ctx.stopped, saved_names, grad_names)


def _tag_inserted(graph: fx.Graph, ctx: RewriteContext) -> None:
    """Mark the nodes the program added, so tools (show, draw) can tell them from the model's."""
    for node in graph.nodes:
        if node not in ctx.original and node.op != "output" and INSERTED not in node.meta:
            node.meta[INSERTED] = "source" if node in ctx.source_nodes else "inserted"


def _remove_taps(graph: fx.Graph, original: set[fx.Node]) -> None:
    """Drop the taps; a model value each marked takes the site's name (the outermost module's)."""
    named: set[fx.Node] = set()
    for node in list(graph.nodes):
        if not is_tap(node):
            continue
        value, site = node.args
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        is_output = ":" not in site or ":out" in site
        renamable = value in original and value.op in ("call_function", "call_method", "call_module")
        if renamable and (is_output or value not in named):
            value._rename(readable(site))
            value.meta[SITE] = site
            named.add(value)
