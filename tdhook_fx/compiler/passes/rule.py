"""rule SITE = NAME(ARGS): relevance through the module at SITE propagates by an LRP rule.

The rule is a rewrite of the module's region of the graph: its inputs, its output, or both, are
replaced by values equal to them whose gradient is the rule's relevance (`passes/relevance.py`).
The forward is unchanged; the graph has no hooks and no custom autograd function, so a backward
through it (also after torch.compile or torch.export) carries relevance.

- epsilon-type rules (epsilon, uniform_epsilon) keep the module's own backward and rewrite the
  region's boundary: each input becomes `times_input(x)` (gradient x input), the output
  `epsilon_normalized(y)` (gradient / stabilized y). Rules on modules inside the region still
  apply, as they would for a module whose forward was replaced.
- rules with other parameters (w_square, flat, alpha_beta) and layer_norm add a small module
  that recomputes the module on its inputs (`relevance.surrogate(self.rule_<site>, y, x)`) and
  take the gradient through that surrogate;
- the others (pass, stop, uniform, softmax_epsilon, pseudo_identity, ahqkv) are one function of
  the output (and inputs).
"""

from __future__ import annotations

from torch import nn

from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.compiler.graphs import readable
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.passes import relevance
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.compiler.rules import RULES, relevance_inputs


def insert_rule(ctx: RewriteContext, intervention: Intervention) -> None:
    statement = intervention.statement
    kind = RULES[statement.name]
    arguments = kind.arguments(statement.args)
    output = intervention.site
    table = _site_table(ctx)
    inputs = [s.name for s in relevance_inputs(table.activations(output.module, output.call, "in"))]
    module = table.modules[output.module]
    site = output.name
    if kind.name in ("epsilon", "uniform_epsilon"):
        for name in inputs:
            _rewrite_use(ctx, name, relevance.times_input, name=f"rule_in_{name}")
        count = len(inputs) if kind.name == "uniform_epsilon" else 1
        _rewrite(ctx, site, relevance.epsilon_normalized, arguments["epsilon"], count, name=f"rule_{site}")
    elif kind.name in ("w_square", "flat", "alpha_beta", "layer_norm"):
        surrogate = (
            relevance.LayerNormEpsilon(module, arguments["epsilon"], site)
            if kind.name == "layer_norm"
            else relevance.ChangedParameters(module, kind.name, arguments, site)
        )
        _rewrite_with_module(ctx, site, surrogate, [ctx.current[name] for name in inputs])
    else:
        function, extra = _FUNCTIONS[kind.name]
        operands = [] if kind.name in ("stop", "ahqkv") else [ctx.current[name] for name in inputs]
        _rewrite(ctx, site, function, *operands, *(arguments[a] for a in extra), name=f"rule_{site}")


_FUNCTIONS = {
    "pass": (relevance.passed, ()),
    "stop": (relevance.stopped, ()),
    "uniform": (relevance.shared, ()),
    "softmax_epsilon": (relevance.softmax_relevance, ()),
    "pseudo_identity": (relevance.pseudo_identity, ("stabilizer",)),
    "ahqkv": (relevance.values_only, ()),
}


def _rewrite(ctx: RewriteContext, site: str, function, *args, name: str) -> None:
    """The site's value becomes `function(value, *args)` for everything after it."""
    with ctx.after_value(site), ctx.new_nodes() as made:
        new = ctx.call(function, ctx.current[site], *args, name=name)
    ctx.replace(site, new, made)


def _rewrite_use(ctx: RewriteContext, site: str, function, *args, name: str) -> None:
    """The module reads `function(value, *args)` at an input site; the site itself keeps its value,
    so a later `save grad` of it reads what the rule passes back (the relevance), not what the
    rule receives."""
    old = ctx.current[site]
    with ctx.after_value(site), ctx.new_nodes() as made:
        new = ctx.call(function, old, *args, name=name)
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in made and user not in ctx.pinned)


def _rewrite_with_module(ctx: RewriteContext, site: str, surrogate: nn.Module, inputs: list) -> None:
    """The site's value becomes `relevance.surrogate(self.rule_<site>, value, *inputs)`."""
    target = ctx.unused_name(readable(f"rule_{site}"))
    ctx.attributes[target] = surrogate
    with ctx.after_value(site), ctx.new_nodes() as made:
        module = ctx.graph.get_attr(target)
        new = ctx.call(relevance.surrogate, module, ctx.current[site], *inputs, name=f"relevance_{site}")
    ctx.replace(site, new, made)


def _site_table(ctx: RewriteContext) -> SiteTable:
    """A site table of the capture (every table of one capture has the same sites and modules)."""
    return next(iter(ctx.capture.site_tables.values()))
