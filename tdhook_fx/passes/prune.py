"""prune PARAM AMOUNT [by CRITERION] [along DIM]: zero weights by a mask, per use of the parameter.

The mask multiplies the parameter only where the owning module uses it (found by the nodes'
`nn_module_stack`), so a tied weight (GPT-2's `wte`/`lm_head`) is pruned only where the
program names it. Magnitude and random masks are computed once, here, and stored in the graph
module; a `$importance` mask is computed in the graph from the runtime scores.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tdhook_fx.errors import Diagnostic, ResolutionError
from tdhook_fx.ir import Intervention
from tdhook_fx.passes import ops
from tdhook_fx.passes.context import RewriteContext, fetch_attr, readable
from tdhook_fx.passes.masks import magnitude_mask, random_mask
from tdhook_fx.syntax import ast


def insert_prune(ctx: RewriteContext, intervention: Intervention) -> None:
    statement: ast.Prune = intervention.statement
    site = intervention.site
    parameter = _parameter(ctx, site.name)
    uses = _uses(ctx, parameter, site.module)
    if not uses:
        message = f"{site.name} is not used by {site.module or 'the model'}'s forward on the example"
        raise ResolutionError([Diagnostic(statement.span, message)], ctx.resolved.text)
    amount = statement.amount.value / 100 if statement.amount.percent else statement.amount.value
    name = f"prune_mask_{readable(site.name)}"
    first = min(uses, key=lambda use: _position(ctx.graph, use[0]))[0]
    with ctx.graph.inserting_before(first):
        if isinstance(statement.criterion, ast.Importance):
            scores = ctx.runtime[statement.criterion.var.name]
            weight = uses[0][0].args[uses[0][1]]
            mask = ctx.call(ops.importance_mask, scores, weight, amount, statement.dim, name=name)
        else:
            ctx.attributes[name] = _mask(parameter.detach(), amount, statement)
            mask = ctx.graph.get_attr(name)
    for user, position in uses:
        weight = user.args[position]
        with ctx.graph.inserting_before(user):
            masked = ctx.call(operator.mul, weight, mask, name=f"pruned_{site.name}")
        user.update_arg(position, masked)


def _mask(weight: torch.Tensor, amount, statement: ast.Prune) -> torch.Tensor:
    criterion = statement.criterion
    if isinstance(criterion, ast.Random):
        return random_mask(weight, amount, statement.dim, criterion.seed)
    return magnitude_mask(weight, amount, statement.dim)


def _parameter(ctx: RewriteContext, name: str) -> torch.Tensor:
    """The parameter as the captured graph holds it (the model sits at `model.` in both front ends)."""
    return fetch_attr(ctx.capture.graph_module, f"model.{name}")


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
