"""Concepts equal tdhook 0.3.0's on a CNN: the relevance of concept examples at a layer, the
selected channel, and the LRP conditioned on it (zennit-crp: tests/attribution/lrp/test_references)."""

from __future__ import annotations

import pytest
import tdhook.attribution as their_attribution
import tdhook.attribution.lrp_helpers.rules as their_rules
import tdhook.concepts as their_concepts
import torch
from tdhook.workflow import Workflow
from tensordict import TensorDict

import tdhook_fx.concepts as our_concepts
from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.lrp_helpers import rules as our_rules
from tests.attribution.lrp.helpers import target
from tests.attribution.lrp.models import cnn

LABELS = torch.tensor([1, 1, 1, 0, 0, 0])


def examples() -> TensorDict:
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return TensorDict(input=x, concept_labels=LABELS, batch_size=[6])


def lrp(lrp_class, rules, **options):
    return lrp_class(rule_mapper=rules.EpsilonPlus(), skip_modules=lrp_class.default_skip, init_attr_targets=target,
                     warn_on_missing_rule=False, **options)


def ours(direction: str, layer: str = "4") -> TensorDict:
    td = examples()
    with lrp(LRP, our_rules, input_modules=[layer], attribution_key=("attributions", "concept_examples")).prepare(cnn()) as hooked:
        td = hooked(td)
    td = our_concepts.ConceptSelection(("attributions", "concept_examples", layer), direction=direction)(td)
    conditioned = our_concepts.ChannelConditionedLRP(lrp(LRP, our_rules), condition_module=layer, gradient_channel_axis=1)
    with conditioned.prepare(cnn()) as hooked:
        return hooked(td)


def theirs(direction: str, layer: str = "4") -> TensorDict:
    workflow = Workflow(
        lrp(their_attribution.LRP, their_rules, input_modules=[layer], attribution_key=("attributions", "concept_examples")),
        their_concepts.ConceptSelection(("attributions", "concept_examples", layer), direction=direction),
        their_concepts.ChannelConditionedLRP(lrp(their_attribution.LRP, their_rules), condition_module=layer, gradient_channel_axis=1),
    )
    return workflow(cnn(), examples())


@pytest.mark.parametrize("direction", ["positive", "negative"])
@pytest.mark.parametrize("layer", ["4", "1"])
def test_the_concept_workflow_equals_tdhooks(direction, layer):
    mine, reference = ours(direction, layer), theirs(direction, layer)
    for key in ("positive_mean", "negative_mean", "scores", "channel", "direction", "score"):
        torch.testing.assert_close(mine["metrics", "concept_selection", key], reference["metrics", "concept_selection", key])
    for key in (("attributions", "concept_examples", layer), ("attributions", "conditioned", "input")):
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-7)


def test_the_conditioned_relevance_is_one_channels_share():
    """Conditioning on every channel in turn and adding up gives the unconditioned relevance."""
    td = examples()
    with lrp(LRP, our_rules).prepare(cnn()) as hooked:
        whole = hooked(td.clone())["attr", "input"]
    method = our_concepts.ChannelConditionedLRP(lrp(LRP, our_rules), condition_module="4", gradient_channel_axis=1)
    total = torch.zeros_like(whole)
    with method.prepare(cnn()) as hooked:
        for channel in range(8):
            td["metrics", "concept_selection"] = TensorDict(channel=torch.full((6,), channel), direction=torch.ones(6, dtype=torch.long), batch_size=[6])
            total += hooked(td.clone())["attributions", "conditioned", "input"]
    torch.testing.assert_close(total, whole, rtol=1e-4, atol=1e-6)


def test_the_gradient_callback_keeps_one_channel():
    callback = our_concepts.concept_channel_gradient_callback(2, -1, channel_axis=1)
    (masked,) = callback((torch.ones(2, 4, 3),))
    assert masked[:, 2].eq(-1).all() and masked[:, [0, 1, 3]].eq(0).all()
    with pytest.raises(ValueError, match="invalid for gradient shape"):
        callback((torch.ones(2, 2, 3),))
    with pytest.raises(ValueError, match="non-negative"):
        our_concepts.concept_channel_gradient_callback(-1, 1)
    with pytest.raises(ValueError, match="either -1 or 1"):
        our_concepts.concept_channel_gradient_callback(0, 2)


def test_mistakes_are_refused_as_tdhook_does():
    with pytest.raises(ValueError, match="direction"):
        our_concepts.ConceptSelection("relevance", direction="sideways")
    with pytest.raises(TypeError, match="nested keys"):
        our_concepts.ConceptSelection(object())
    select = our_concepts.ConceptSelection("relevance", labels_key="labels")
    for relevances, labels in [(torch.ones(2), torch.tensor([1, 0])), (torch.ones(2, 3), torch.tensor([1, 1])),
                               (torch.ones(2, 3), torch.tensor([-1, 1])), (torch.ones(2, 0), torch.tensor([1, 0]))]:
        with pytest.raises(ValueError):
            select(TensorDict(relevance=relevances, labels=labels, batch_size=[2]))
    with pytest.raises(TypeError, match="LRP method"):
        our_concepts.ChannelConditionedLRP(torch.nn.Identity(), condition_module="4")
    with pytest.raises(ValueError, match="condition_module"):
        our_concepts.ChannelConditionedLRP(LRP(), condition_module="")
    with pytest.raises(ValueError, match="already has"):
        our_concepts.ChannelConditionedLRP(LRP(output_grad_callbacks={"4": lambda **kw: None}), condition_module="4")
    method = our_concepts.ChannelConditionedLRP(lrp(LRP, our_rules), condition_module="4", gradient_channel_axis=1)
    td = examples()
    td["metrics", "concept_selection"] = TensorDict(channel=torch.arange(6), direction=torch.ones(6, dtype=torch.long), batch_size=[6])
    with method.prepare(cnn()) as hooked, pytest.raises(ValueError, match="identical for every example"):
        hooked(td)
