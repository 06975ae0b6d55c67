"""set SITE[INDEX] = EXPR: overwrite the site's value (whole, or the indexed part)."""

from __future__ import annotations

import torch

from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext


def insert_set(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site.name
    old = ctx.current[site]
    index = ctx.index(intervention.index)
    with ctx.after_value(site), ctx.new_nodes() as made:
        region = old if index is None else ctx.region(old, index, where=ctx.where(intervention))
        value = ctx.value(intervention.statement.value, region, intervention)
        if index is None:
            target = torch.full_like if isinstance(value, (int, float)) else ops.filled
            new = ctx.call(target, old, value, name=f"set_{site}")
        else:
            new = ctx.call(ops.assign, old, index, value, *ctx.where(intervention), name=f"set_{site}")
    ctx.replace(site, new, made)
