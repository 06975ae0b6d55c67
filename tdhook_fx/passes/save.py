"""save SITE[INDEX] [as NAME]: the site's value at this point of the program becomes an output."""

from __future__ import annotations

import operator

from tdhook_fx.ir import Intervention
from tdhook_fx.passes.context import RewriteContext


def insert_save(ctx: RewriteContext, intervention: Intervention) -> None:
    site = intervention.site.name
    value = ctx.current[site]
    if intervention.index is not None:
        with ctx.after_value(site):
            value = ctx.call(operator.getitem, value, ctx.index(intervention.index), name=f"save_{intervention.name}")
    ctx.saved[intervention.name] = value
