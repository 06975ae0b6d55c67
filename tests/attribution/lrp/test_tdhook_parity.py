"""tdhook_fx's LRP gives tdhook 0.3.0's relevances: every rule, both composites, the layer groups,
on an MLP, a CNN with batch norm and pooling, and a transformer block (LayerNorm aside: below)."""

from __future__ import annotations

import pytest
import tdhook.attribution as theirs_attribution
import tdhook.attribution.lrp_helpers.rules as their_rules
import tdhook.attribution.lrp_helpers.types as their_types
import torch
from torch import nn

import tdhook_fx.attribution.lrp_helpers.rules as our_rules
import tdhook_fx.attribution.lrp_helpers.types as our_types
from tdhook_fx.attribution.lrp import LRP
from tests.attribution.lrp.helpers import MAPPERS, attn_lrp, first_layer, relevance, target
from tests.attribution.lrp.models import block, cnn, inputs, mlp

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def on(layers, rule):
    """EpsilonPlus, with `rule(rules)` for the modules named in `layers`."""
    return lambda rules: rules.EpsilonPlus(rule_mapper=lambda name, module: rule(rules) if name in layers else None)


CASES = {
    **{f"cnn/{name}": ("cnn", mapper) for name, mapper in MAPPERS.items()},
    **{f"mlp/{name}": ("mlp", mapper) for name, mapper in MAPPERS.items() if name != "epsilon_alpha2_beta1"},
    "cnn/zplus via alpha_beta(1, 0)": ("cnn", on({"0", "4"}, lambda r: r.AlphaBetaRule(1.0, 0.0, 1e-4))),
    "cnn/uniform_epsilon": ("cnn", on({"8"}, lambda r: r.UniformEpsilonRule(1e-3))),
    "cnn/epsilon on batch norm": ("cnn", on({"1"}, lambda r: r.EpsilonRule(0.01))),
    "cnn/stop": ("cnn", on({"2"}, lambda r: r.StopRule())),
    "cnn/uniform": ("cnn", on({"2", "5"}, lambda r: r.UniformRule())),
    "cnn/pseudo_identity": ("cnn", on({"2", "5"}, lambda r: r.PseudoIdentityRule(1e-3))),
    "cnn/ignore": ("cnn", on({"2", "6"}, lambda r: r.IgnoreRule())),
    "mlp/w_square everywhere": ("mlp", lambda r: r.BaseRuleMapper(rule_mapper=lambda n, m: r.WSquareRule() if isinstance(m, nn.Linear) else None)),
    "mlp/flat second": ("mlp", on({"2"}, lambda r: r.FlatRule(1e-3))),
    "block/attention rules, LayerNorm passing": ("block", attn_lrp(layer_norm=False)),
    "block/ahqkv": ("block", attn_lrp(layer_norm=False, values_only=True)),
}
MODELS = {"mlp": mlp, "cnn": cnn, "block": block}


@pytest.mark.parametrize("case", CASES)
def test_equal_to_tdhook(case):
    model_name, mapper = CASES[case]
    model, x = MODELS[model_name](), inputs(model_name)
    ours = relevance(LRP, our_rules, mapper, model, x)
    reference = relevance(theirs_attribution.LRP, their_rules, mapper, model, x)
    torch.testing.assert_close(ours, reference, **TOLERANCE)


def test_attributions_to_modules_and_several_targets_equal_tdhook():
    """input_modules: the relevance reaching a module's output (before its own rule)."""
    model, x = cnn(), inputs("cnn")
    options = {"input_modules": ["4", "8"], "use_inputs": False}
    ours = relevance_by_key(LRP, our_rules, model, x, **options)
    reference = relevance_by_key(theirs_attribution.LRP, their_rules, model, x, **options)
    for key in ("4", "8"):
        torch.testing.assert_close(ours[key], reference[key], **TOLERANCE)


def relevance_by_key(lrp_class, rules, model, x, **options):
    from tensordict import TensorDict

    method = lrp_class(rule_mapper=rules.EpsilonPlus(), skip_modules=lrp_class.default_skip, init_attr_targets=target,
                       warn_on_missing_rule=False, **options)
    with method.prepare(model) as hooked:
        return hooked(TensorDict(input=x, batch_size=[len(x)]))["attr"]


def test_tdhooks_layer_norm_rule_conserves_nothing():
    """tdhook 0.3.0's LayerNormRule returns the plain gradient of the normalization (std held
    constant), which sums to 0 over the normalized dimension; tdhook_fx's is LXT's (see
    test_references: equal to LXT), which passes the relevance on."""
    norm = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    mapper = lambda rules: rules.BaseRuleMapper(
        rule_mapper=lambda n, m: rules.LayerNormRule() if isinstance(m, nn.LayerNorm) else rules.EpsilonRule(1e-9) if isinstance(m, nn.Linear) else None
    )
    theirs = relevance(theirs_attribution.LRP, their_rules, mapper, norm, x)
    ours = relevance(LRP, our_rules, mapper, norm, x)
    torch.testing.assert_close(theirs.sum(-1), torch.zeros(4), atol=1e-5, rtol=0)
    into_norm = relevance(LRP, our_rules, lambda r: r.BaseRuleMapper(rule_mapper=lambda n, m: r.EpsilonRule(1e-9) if isinstance(m, nn.Linear) else None), norm[1:], norm[0](x).detach())
    torch.testing.assert_close(ours.sum(-1), into_norm.sum(-1), rtol=1e-4, atol=1e-5)  # no bias: all of it


def test_layer_groups_and_composites_match_tdhooks():
    layers = [nn.Conv1d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1), nn.Linear(2, 2), nn.BatchNorm2d(2), nn.AvgPool2d(2),
              nn.AdaptiveMaxPool1d(2), nn.GELU(), nn.Softmax(-1), nn.LayerNorm(2), nn.Identity(), nn.Flatten()]
    groups = ["ConvolutionTranspose", "ConvolutionStandard", "Convolution", "Linear", "BatchNorm", "AvgPool", "MaxPool", "Activation"]
    for layer in layers:
        for group in groups:
            assert isinstance(layer, getattr(our_types, group)) == isinstance(layer, getattr(their_types, group)), (layer, group)
        for composite in ("BaseRuleMapper", "EpsilonPlus"):
            ours, reference = getattr(our_rules, composite)()("x", layer), getattr(their_rules, composite)()("x", layer)
            assert type(ours).__name__ == type(reference).__name__, (layer, composite)


def test_rule_parameters_are_checked_as_tdhook_does():
    with pytest.raises(ValueError, match="non-negative"):
        our_rules.AlphaBetaRule(alpha=-1, beta=-2)
    with pytest.raises(ValueError, match="alpha - beta must equal 1"):
        our_rules.AlphaBetaRule(alpha=2, beta=2)
    rule = our_rules.EpsilonRule(0.1)
    rule.epsilon = 0.2
    assert rule.arguments() == (0.2,)
    first = first_layer(lambda r: r.FlatRule())(our_rules)
    assert isinstance(first("0", nn.Linear(2, 2)), our_rules.FlatRule)
