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

from tdhook_fx.compiler.graphs import fetch_attr, readable
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.meta import INSERTED
from tdhook_fx.compiler.passes.prune import _module_calls, _uses
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
        _call_with_edited(ctx, call, site.item, intervention)


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


def _call_with_edited(ctx: RewriteContext, call: fx.Node, attribute: str, intervention: Intervention) -> None:
    """A whole-module call run with one parameter edited: torch.func.functional_call."""
    with ctx.graph.inserting_before(call):
        if call.op == "call_module":
            module = ctx.graph.get_attr(call.target)
            module._rename(readable(f"module_{call.target.removeprefix('model.')}"))
            overrides, args, kwargs = {}, call.args, call.kwargs
        else:
            module, overrides, args, kwargs = call.args
            overrides = dict(overrides)
        weight = overrides.get(attribute) or ctx.graph.get_attr(f"{module.target}.{attribute}")
        overrides[attribute] = _edited(ctx, weight, intervention)
        new = ctx.call(torch.func.functional_call, module, overrides, tuple(args), dict(kwargs), name=call.name)
    call.replace_all_uses_with(new)
    ctx.graph.erase_node(call)
    ctx.original.add(new)  # still the model's own value (named after its site later)
    new.meta[INSERTED] = "changed"
