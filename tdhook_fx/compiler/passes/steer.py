"""steer SITE[INDEX] (+=|-=|*=) EXPR: add to, subtract from or scale the site's value."""

from __future__ import annotations

import operator

from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext

_OPERATORS = {"+=": operator.add, "-=": operator.sub, "*=": operator.mul}


def insert_steer(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site.name
    old = ctx.current[site]
    index = ctx.index(intervention.index)
    op = intervention.statement.op
    with ctx.after_value(site), ctx.new_nodes() as made:
        region = old if index is None else ctx.region(old, index, where=ctx.where(intervention))
        value = ctx.value(intervention.statement.value, region, intervention)
        if index is None:
            new = ctx.call(_OPERATORS[op], old, value, name=f"steer_{site}")
        else:
            new = ctx.call(ops.steer_at, old, index, op, value, *ctx.where(intervention), name=f"steer_{site}")
    ctx.replace(site, new, made)
