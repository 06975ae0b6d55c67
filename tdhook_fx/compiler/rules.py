"""LRP rules the `rule SITE = NAME(ARGS)` statement names: their parameters and what they need.

A rule says how relevance that reaches a module's output is passed back to its inputs (layer-wise
relevance propagation, Bach et al. 2015). `passes/rule.py` turns each into a rewrite of the
module's region of the graph; this module only knows names, parameters and requirements, so
that resolution can refuse a rule that cannot apply before anything is rewritten.

| rule | relevance at the inputs x_i from R at the output y |
|---|---|
| `epsilon(epsilon)` | x_i * J_i^T (R / (y + epsilon * sign y)) (the module's own Jacobian J) |
| `uniform_epsilon(epsilon)` | the same, divided by the number of inputs |
| `pass` | R itself (inputs and outputs of equal shapes, one for one) |
| `stop` | nothing |
| `uniform` | R / number of inputs, to each |
| `w_square(stabilizer)` | J'^T (R / z') at inputs of ones, parameters squared (z' that output) |
| `flat(stabilizer)` | the same with weights of ones and no bias |
| `alpha_beta(alpha, beta, stabilizer)` | alpha times the positive and -beta times the negative contributions (one input) |
| `softmax_epsilon(epsilon)` | x * (R - y * sum(R)) over the last dimension (-inf inputs count as 0) |
| `layer_norm(epsilon)` | the epsilon rule through the module with its standard deviation held constant |
| `pseudo_identity(stabilizer)` | R * y / x (one input) |
| `ahqkv` | the plain gradient with the first two thirds of the output (query, key) held constant |
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from tdhook_fx.compiler.capture.sites import SiteInfo
from tdhook_fx.compiler.shapes import broadcasts_to

STABILIZER = 1e-6


@dataclass(frozen=True)
class RuleKind:
    name: str
    parameters: tuple[tuple[str, float], ...] = ()  # (name, default) in order
    one_input: bool = False  # the rule is defined for modules with one (floating-point) input
    params: bool = False  # the rule recomputes the module with changed parameters

    def arguments(self, args: tuple) -> dict[str, float]:
        """The rule's parameters by name, given positionally (defaults for the rest)."""
        names = [name for name, _ in self.parameters]
        return {**dict(self.parameters), **dict(zip(names, args))}

    def signature(self) -> str:
        return f"{self.name}(" + ", ".join(f"{n}={d:g}" for n, d in self.parameters) + ")" if self.parameters else self.name


RULES = {
    kind.name: kind
    for kind in (
        RuleKind("epsilon", (("epsilon", STABILIZER),)),
        RuleKind("uniform_epsilon", (("epsilon", STABILIZER),)),
        RuleKind("pass", one_input=True),
        RuleKind("stop"),
        RuleKind("uniform"),
        RuleKind("w_square", (("stabilizer", STABILIZER),), params=True),
        RuleKind("flat", (("stabilizer", STABILIZER),), params=True),
        RuleKind("alpha_beta", (("alpha", 2.0), ("beta", 1.0), ("stabilizer", STABILIZER)), one_input=True, params=True),
        RuleKind("softmax_epsilon", (("epsilon", STABILIZER),), one_input=True),
        RuleKind("layer_norm", (("epsilon", STABILIZER),), one_input=True),
        RuleKind("pseudo_identity", (("stabilizer", STABILIZER),), one_input=True),
        RuleKind("ahqkv"),
    )
}


def relevance_inputs(inputs: list[SiteInfo]) -> list[SiteInfo]:
    """The inputs relevance flows to: the floating-point ones (not token ids or masks)."""
    return [site for site in inputs if site.dtype.is_floating_point]


def rule_problem(kind: RuleKind, args: tuple, module: nn.Module, inputs: list[SiteInfo], outputs: list[SiteInfo]) -> str | None:
    """Why `kind(args)` cannot apply to `module` with these input and output sites (None: it can)."""
    if len(args) > len(kind.parameters):
        return f"{kind.name} takes {len(kind.parameters)} argument{'s' if len(kind.parameters) != 1 else ''}: {kind.signature()}"
    values = kind.arguments(args)
    if any(v < 0 for v in values.values()):
        return f"{kind.name}'s arguments must not be negative; got {kind.name}({', '.join(f'{a:g}' for a in args)})"
    if kind.name == "alpha_beta" and values["alpha"] - values["beta"] != 1:
        return f"alpha_beta needs alpha - beta = 1; got alpha={values['alpha']:g}, beta={values['beta']:g}"
    if len(outputs) != 1 or outputs[0].item is not None:
        return f"a rule needs a module with one tensor output; this call returns {len(outputs)}"
    floating = relevance_inputs(inputs)
    if not floating and kind.name not in ("stop",):
        return "the module has no floating-point input for relevance to reach"
    if kind.one_input and len(floating) != 1:
        return f"{kind.name} applies to a module with one input; this call has {len(floating)}"
    output = outputs[0]
    if kind.name == "pass" and any(site.shape != output.shape for site in floating):
        shapes = ", ".join(str(s.shape) for s in floating)
        return f"pass needs inputs shaped like the output {output.shape}; the inputs are {shapes}"
    if kind.name == "uniform" and not all(broadcasts_to(site.shape, output.shape) for site in floating):
        return f"uniform needs inputs that broadcast to the output's shape {output.shape}"
    if kind.name == "ahqkv" and (not output.shape or output.shape[-1] % 3):
        return f"ahqkv needs an output whose last dimension holds query, key and value (a multiple of 3); got {output.shape}"
    if kind.name == "layer_norm" and not all(hasattr(module, a) for a in ("weight", "bias", "eps")):
        return f"layer_norm needs a module with weight, bias and eps (as nn.LayerNorm); {type(module).__name__} has not"
    if kind.params and not any(True for _ in module.parameters(recurse=False)):
        return f"{kind.name} changes the module's own parameters; {type(module).__name__} has none"
    return None


def rule_problem_at(statement, site: SiteInfo, index, table, ruled: dict) -> tuple[str, ...] | None:
    """(message, hints...) when `statement` (a `rule`) cannot apply at `site` of `table`; None if it can.

    `ruled` holds the module calls that earlier statements gave a rule: one rule per call.
    """
    kind = RULES.get(statement.name)
    if kind is None:
        close = difflib.get_close_matches(statement.name, RULES, n=1)
        return (
            f"unknown rule '{statement.name}'",
            f"did you mean '{close[0]}'?" if close else "",
            "rules: " + ", ".join(RULES),
        )
    label = site.module + (f"@{site.call}" if site.call else "")
    if site.kind != "out" or index is not None:
        return (f"a rule applies to a module, not to '{site.name}'" + ("[...]" if index is not None else ""), f"write rule {label} = {statement.name}")
    if (site.module, site.call) in ruled:
        return (f"{label} already has a rule: {ruled[(site.module, site.call)]}", "give each module call one rule")
    module = table.modules[site.module]
    problem = rule_problem(kind, statement.args, module, table.activations(site.module, site.call, "in"), table.activations(site.module, site.call, "out"))
    return None if problem is None else (f"{label} ({type(module).__name__}): {problem}",)
