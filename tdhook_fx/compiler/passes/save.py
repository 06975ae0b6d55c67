"""save SITE[INDEX] [as NAME]: the site's value at this point of the program becomes an output."""

from __future__ import annotations

from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext


def insert_save(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site.name
    value = ctx.current[site]
    with ctx.after_value(site), ctx.new_nodes() as made:
        if intervention.index is not None:
            index = ctx.index(intervention.index)
            value = ctx.region(value, index, name=f"save_{intervention.name}", where=ctx.where(intervention))
        if ctx.capture.mutates:  # the model may change this tensor in place further on
            value = ctx.method("clone", value, name=f"saved_{intervention.name}")
    ctx.saved[intervention.name] = value
    ctx.pinned |= made
