"""set PARAM[INDEX] = EXPR and steer PARAM[INDEX] (+=|-=|*=) EXPR: a weight edited where its module uses it.

As `prune` does, the edit happens at each use of the parameter inside its owning module (found
by the nodes' `nn_module_stack`), so a tied weight (GPT-2's `wte`/`lm_head`) changes only where
the program names it, and the model's parameter is never written. Runtime values (`$alpha`,
`$tau`) are graph inputs: `steer fc.weight += $alpha * $tau` computes `weight + alpha * tau` in
the graph, so another alpha or task vector needs no recompilation, and the edit is
differentiable with respect to them. Statements on one parameter apply in program order: each
edits the weight as the earlier ones left it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tdhook_fx.compiler.graphs import fetch_attr
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.prune import _module_calls, _uses, call_with_parameter
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.errors import Diagnostic, ResolutionError
from tdhook_fx.syntax import ast

_STEER = {"+=": operator.add, "-=": operator.sub, "*=": operator.mul}


def insert_parameter_edit(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site
    parameter = fetch_attr(ctx.capture.graph_module, f"model.{site.name}")
    uses = [use for node, position in _uses(ctx, parameter, site.module) for use in _through_edits(ctx, node, position)]
    calls = _module_calls(ctx, site.module)
    if not uses and not calls:
        message = f"{site.name} is not used by {site.module or 'the model'}'s forward on the example"
        raise ResolutionError([Diagnostic(intervention.statement.span, message)], ctx.resolved.text)
    for user, position in dict.fromkeys(uses):
        with ctx.graph.inserting_before(user):
            edited = _edited(ctx, user.args[position], intervention)
        edited.meta["nn_module_stack"] = user.meta.get("nn_module_stack", {})
        user.update_arg(position, edited)
    for call in calls:
        call_with_parameter(ctx, call, site.item, lambda weight, _: _edited(ctx, weight, intervention))


def _through_edits(ctx: RewriteContext, node: fx.Node, position: int) -> list[tuple[fx.Node, int]]:
    """The model's own use that `node`'s argument `position` feeds, through earlier edits (masks)."""
    if node in ctx.original:
        return [(node, position)]
    return [
        use
        for user in node.users
        for i, argument in enumerate(user.args)
        if argument is node
        for use in _through_edits(ctx, user, i)
    ]


def _edited(ctx: RewriteContext, weight: fx.Node, intervention: Intervention) -> fx.Node:
    """The nodes computing the edited weight from `weight` (its value so far)."""
    statement = intervention.statement
    name = f"{type(statement).__name__.lower()}_{intervention.site.name}"
    index = ctx.index(intervention.index)
    region = weight if index is None else ctx.region(weight, index)
    value = ctx.value(statement.value, region, intervention)
    if isinstance(statement, ast.Steer):
        if index is None:
            return ctx.call(_STEER[statement.op], weight, value, name=name)
        return ctx.call(ops.steer_at, weight, index, statement.op, value, name=name)
    if index is None:
        target = torch.full_like if isinstance(value, (int, float)) else ops.filled
        return ctx.call(target, weight, value, name=name)
    return ctx.call(ops.assign, weight, index, value, name=name)
