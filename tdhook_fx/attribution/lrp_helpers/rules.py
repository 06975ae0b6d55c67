"""LRP rules (tdhook.attribution.lrp_helpers.rules): what each module passes back as relevance.

A rule here is a description, not a hook: `LRP` turns the rule of each module into a statement
`rule SITE = NAME(ARGS)` of the compiled program, a rewrite of the module's region of the graph
(see `tdhook_fx.compiler.rules` for the formulas). The names and parameters are tdhook's; the
composites map modules to rules by layer type, as tdhook's and zennit's do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from tdhook_fx.attribution.lrp_helpers.layers import Sum
from tdhook_fx.attribution.lrp_helpers.types import (
    Activation,
    AvgPool,
    BatchNorm,
    Convolution,
    Linear,
    MaxPool,
)
from tdhook_fx.errors import InvalidArgument, MethodUsageError


def stabilize(tensor: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """`tensor` moved `epsilon` away from zero, towards its sign (zero counts as positive)."""
    return tensor + torch.where(tensor < 0, -epsilon, epsilon)


class Rule:
    """A rule for one module type: `name` is the rule the program names, `arguments()` its numbers."""

    name: ClassVar[str]

    def arguments(self) -> tuple:
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.arguments()))})"


class EpsilonRule(Rule):
    """R_i = x_i * J_i^T (R / stabilize(y, epsilon)): the epsilon rule (LRP-0 for epsilon -> 0)."""

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def arguments(self) -> tuple:
        return (self.epsilon,)


class UniformEpsilonRule(EpsilonRule):
    """The epsilon rule, divided equally between the module's inputs."""

    name = "uniform_epsilon"


class PassRule(Rule):
    """The relevance at the output goes to the input unchanged (activations, batch norm)."""

    name = "pass"


class IgnoreRule(Rule):
    """No rule: the module's plain gradient (max-pooling routes relevance to the maximum)."""

    name = "ignore"


class _StabilizedRule(Rule):
    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = stabilizer

    def arguments(self) -> tuple:
        return (self.stabilizer,)


class WSquareRule(_StabilizedRule):
    """Relevance by squared weights, independent of the input (Montavon et al. 2017)."""

    name = "w_square"


class FlatRule(_StabilizedRule):
    """Relevance spread evenly over each output's receptive field (weights of ones, no bias)."""

    name = "flat"


class UniformRule(Rule):
    """The relevance at the output, divided equally between the inputs."""

    name = "uniform"


class StopRule(Rule):
    """No relevance flows to the module's inputs."""

    name = "stop"


class AlphaBetaRule(Rule):
    """alpha times the positive and beta times the negative contributions (alpha - beta = 1);
    alpha=1, beta=0 is the z+ rule."""

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6):
        if alpha < 0 or beta < 0:
            raise InvalidArgument("Both alpha and beta parameters must be non-negative!")
        if alpha - beta != 1.0:
            raise InvalidArgument("The difference of parameters alpha - beta must equal 1!")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def arguments(self) -> tuple:
        return (self.alpha, self.beta, self.stabilizer)


class SoftmaxEpsilonRule(EpsilonRule):
    """Softmax (AttnLRP): R_in = x * (R - y * sum(R)) over the last dimension."""

    name = "softmax_epsilon"


class LayerNormRule(Rule):
    """LayerNorm (AttnLRP): the epsilon rule with the standard deviation held constant.

    tdhook 0.3.0's LayerNormRule returns the plain gradient of that function instead, whose sum
    over the normalized dimension is 0: no relevance is conserved. This one is LXT's, which
    conserves it; `epsilon` is LXT's stabilizer.
    """

    name = "layer_norm"

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def arguments(self) -> tuple:
        return (self.epsilon,)


class PseudoIdentityRule(_StabilizedRule):
    """R_in = R * y / x: relevance through an elementwise rescaling (e.g. a gating)."""

    name = "pseudo_identity"


class AHQKVRule(Rule):
    """For a layer whose output is (query, key, value) concatenated: relevance flows through the
    value only, the attention weights being held constant (conservative propagation, Ali et al. 2022)."""

    name = "ahqkv"


RuleMapper = Callable[[str, nn.Module], "Rule | None"]


class BaseRuleMapper:
    """Rules by layer type: activations and batch norm pass relevance, max-pooling, identities,
    dropout and flatten keep their gradient, sums and average pooling take the epsilon rule with
    `stabilizer`. A `rule_mapper(name, module)` given here is asked first."""

    def __init__(self, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None):
        self._stabilizer = stabilizer
        self._rule_mapper = rule_mapper or (lambda name, module: None)
        self._rules = {"pass": PassRule(), "norm": EpsilonRule(epsilon=stabilizer), "ignore": IgnoreRule()}

    def _call(self, name: str, module: nn.Module) -> Rule | None:
        if isinstance(module, (Activation, BatchNorm)):
            return self._rules["pass"]
        if isinstance(module, (MaxPool, nn.Identity, nn.Dropout, nn.Flatten)):
            return self._rules["ignore"]
        if isinstance(module, (Sum, AvgPool)):
            return self._rules["norm"]
        return None

    def __call__(self, name: str, module: nn.Module) -> Rule | None:
        rule = self._rule_mapper(name, module)
        return self._call(name, module) if rule is None else rule


class EpsilonPlus(BaseRuleMapper):
    """zennit's EpsilonPlus: z+ (alpha 1, beta 0) for convolutions, epsilon for linear layers."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None):
        super().__init__(stabilizer, rule_mapper)
        self._rules["epsilon"] = EpsilonRule(epsilon=epsilon)
        self._rules["zplus"] = AlphaBetaRule(alpha=1.0, beta=0.0, stabilizer=stabilizer)

    def _call(self, name: str, module: nn.Module) -> Rule | None:
        if isinstance(module, Convolution):
            return self._rules["zplus"]
        if isinstance(module, Linear):
            return self._rules["epsilon"]
        return super()._call(name, module)


def raise_for_unconserved_rel_factory(atol: float = 1e-6, rtol: float = 1e-6):
    """A check `(module, in_relevances, out_relevances)` that raises where the relevance a module
    passes back does not sum to what reached it (usable as a full backward hook on a module)."""

    def total(relevances) -> torch.Tensor:
        parts = relevances if isinstance(relevances, tuple) else (relevances,)
        return sum(part.sum() for part in parts if part is not None)

    def raise_for_unconserved_rel(module, in_relevances, out_relevances):
        given, received = total(in_relevances), total(out_relevances)
        if not torch.isclose(given, received, atol=atol, rtol=rtol):
            raise MethodUsageError(
                f"Unconserved relevance for module {type(module).__name__} (in_rel_sum={given}) (out_rel_sum={received})"
            )

    return raise_for_unconserved_rel
