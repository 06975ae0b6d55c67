"""prune PARAM AMOUNT [by CRITERION] [along DIM]: zero weights by a mask, per use of the parameter.

The mask multiplies the parameter only where the owning module uses it (found by the nodes'
`nn_module_stack`), so a tied weight (GPT-2's `wte`/`lm_head`) is pruned only where the
program names it. Magnitude and random masks are computed once, here, and stored in the graph
module; a `$importance` mask is computed in the graph from the runtime scores.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx

from tdhook_fx.compiler.graphs import fetch_attr, readable
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.masks import magnitude_mask, random_mask
from tdhook_fx.compiler.passes.meta import INSERTED
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.errors import Diagnostic, ResolutionError
from tdhook_fx.syntax import ast


def insert_prune(ctx: RewriteContext, intervention: Intervention) -> None:
    statement: ast.Prune = intervention.statement
    site = intervention.site
    parameter = fetch_attr(ctx.capture.graph_module, f"model.{site.name}")  # as the graph holds it
    uses = _uses(ctx, parameter, site.module)
    calls = _module_calls(ctx, site.module)
    if not uses and not calls:
        message = f"{site.name} is not used by {site.module or 'the model'}'s forward on the example"
        raise ResolutionError([Diagnostic(statement.span, message)], ctx.resolved.text)
    amount = statement.amount.value / 100 if statement.amount.percent else statement.amount.value
    name = ctx.unused_name(f"prune_mask_{readable(site.name)}")
    first = min([use for use, _ in uses] + calls, key=lambda node: _position(ctx.graph, node))
    with ctx.graph.inserting_before(first):
        if isinstance(statement.criterion, ast.Importance):
            scores = ctx.runtime[statement.criterion.var.name]
            weight = ctx.graph.get_attr(f"model.{site.name}")
            mask = ctx.call(ops.importance_mask, scores, weight, amount, statement.dim, name=name)
        else:
            ctx.attributes[name] = _mask(parameter.detach(), amount, statement)
            mask = ctx.graph.get_attr(name)
    for user, position in uses:
        with ctx.graph.inserting_before(user):
            masked = ctx.call(operator.mul, user.args[position], mask, name=f"pruned_{site.name}")
        masked.meta["nn_module_stack"] = user.meta.get("nn_module_stack", {})  # a later prune finds it
        user.update_arg(position, masked)
    for call in calls:
        call_with_parameter(ctx, call, site.item, lambda weight, target: ctx.call(operator.mul, weight, mask, name=f"pruned_{target}"))


def _module_calls(ctx: RewriteContext, owner: str) -> list[fx.Node]:
    """Calls of the owner module kept whole (fx leaves), as `call_module` or already functional."""
    target = f"model.{owner}" if owner else "model"
    return [
        node
        for node in ctx.graph.nodes
        if node not in ctx.source_nodes
        and (
            (node.op == "call_module" and node.target == target)
            or (node.target is torch.func.functional_call and node.args[0].target == target)
        )
    ]


def call_with_parameter(ctx: RewriteContext, call: fx.Node, attribute: str, edit: Callable[[fx.Node, str], fx.Node]) -> None:
    """Run a whole-module call with one parameter replaced by `edit(weight, its target)`:
    torch.func.functional_call (edits of the same call, a prune and a `set PARAM`, compose)."""
    with ctx.graph.inserting_before(call):
        if call.op == "call_module":
            module = ctx.graph.get_attr(call.target)
            module._rename(readable(f"module_{call.target.removeprefix('model.')}"))
            overrides, args, kwargs = {}, call.args, call.kwargs
        else:
            module, overrides, args, kwargs = call.args
            overrides = dict(overrides)
        target = f"{module.target}.{attribute}"
        overrides[attribute] = edit(overrides.get(attribute) or ctx.graph.get_attr(target), target)
        new = ctx.call(torch.func.functional_call, module, overrides, tuple(args), dict(kwargs), name=call.name)
    call.replace_all_uses_with(new)
    ctx.graph.erase_node(call)
    ctx.original.add(new)  # still the model's own value (named after its site later)
    new.meta[INSERTED] = "changed"


def _mask(weight: torch.Tensor, amount, statement: ast.Prune) -> torch.Tensor:
    criterion = statement.criterion
    if isinstance(criterion, ast.Random):
        return random_mask(weight, amount, statement.dim, criterion.seed)
    return magnitude_mask(weight, amount, statement.dim)


def _uses(ctx: RewriteContext, parameter: torch.Tensor, owner: str) -> list[tuple[fx.Node, int]]:
    """(node, argument position) for each use of `parameter` inside module `owner`."""
    root = ctx.capture.graph_module
    owner_qualname = "model" + (f".{owner}" if owner else "")
    uses = []
    for node in ctx.graph.nodes:
        if node.op != "get_attr" or node in ctx.source_nodes:
            continue
        if fetch_attr(root, node.target) is not parameter:
            continue
        for user in node.users:
            if user in ctx.source_nodes or not _inside(user, owner_qualname):
                continue
            uses.extend((user, i) for i, arg in enumerate(user.args) if arg is node)
    return uses


def _inside(node: fx.Node, qualname: str) -> bool:
    stack = node.meta.get("nn_module_stack", {})
    names = [value[0] for value in stack.values()]
    if qualname == "model":
        return True
    return any(n == qualname or n.startswith(qualname + "@") for n in names)



def _position(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1
