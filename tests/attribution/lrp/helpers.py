"""Running tdhook_fx's (and tdhook's) LRP on the test models."""

from __future__ import annotations

import warnings

import torch
from tensordict import TensorDict
from torch import nn

from tests.attribution.lrp.models import TARGET_CLASS, Add, MatMul


def target(outputs: TensorDict, _additional) -> TensorDict:
    return TensorDict(t=outputs["output"][..., TARGET_CLASS], batch_size=outputs.batch_size)


def relevance(lrp_class, rules, mapper, model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    """The relevance at the input for the target class (relevance 1 there), with `mapper(rules)`."""
    method = lrp_class(rule_mapper=mapper(rules), skip_modules=lrp_class.default_skip, init_attr_targets=target, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modules without a rule (containers, the model) are expected
        with method.prepare(model) as hooked:
            return hooked(TensorDict(input=x, batch_size=x.shape[:1]))["attr", "input"]


def first_layer(rule):
    """EpsilonPlus with `rule(rules)` for the first layer (module "0")."""
    return lambda rules: rules.EpsilonPlus(rule_mapper=lambda name, module: rule(rules) if name == "0" else None)


MAPPERS = {
    "epsilon_plus": lambda rules: rules.EpsilonPlus(),
    "epsilon_alpha2_beta1": lambda rules: rules.BaseRuleMapper(
        rule_mapper=lambda name, module: rules.AlphaBetaRule(2.0, 1.0) if isinstance(module, nn.Conv2d)
        else rules.EpsilonRule() if isinstance(module, nn.Linear) else None
    ),
    "epsilon_plus_flat": first_layer(lambda rules: rules.FlatRule()),
    "epsilon_plus_w_square": first_layer(lambda rules: rules.WSquareRule()),
}


def attn_lrp(epsilon: float = 1e-6, layer_norm: bool = True, values_only: bool = False):
    """AttnLRP (LXT) on tests' Block: epsilon for linear layers and residual sums, the uniform
    epsilon for products, the softmax and LayerNorm rules, GELU passing relevance; with
    `values_only`, AHQKV on the qkv projection instead (the attention held constant)."""

    def mapper(rules):
        def rule(name, module):
            if isinstance(module, nn.LayerNorm):
                return rules.LayerNormRule() if layer_norm else rules.PassRule()
            if isinstance(module, nn.Softmax):
                return rules.SoftmaxEpsilonRule()
            if isinstance(module, MatMul):
                return rules.UniformEpsilonRule(epsilon)
            if isinstance(module, Add) or (isinstance(module, nn.Linear) and not (values_only and name == "qkv")):
                return rules.EpsilonRule(epsilon)
            if values_only and name == "qkv":
                return rules.AHQKVRule()
            return None

        return rules.BaseRuleMapper(rule_mapper=rule)

    return mapper
