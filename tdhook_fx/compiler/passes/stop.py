"""stop SITE: nothing after SITE is needed; the module returns only the saved values.

The cut itself is dead code elimination at the end of the rewrite: once the model's outputs
are dropped, everything that only they needed goes.
"""

from __future__ import annotations

from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext


def insert_stop(ctx: RewriteContext, intervention: Intervention) -> None:
    ctx.stopped = True
