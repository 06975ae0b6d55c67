"""Pruning: masks as torch.nn.utils.prune computes them, applied per use of a parameter."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx.compiler.passes.masks import magnitude_mask, random_mask
from tdhook_fx.testing import assert_equivalent


def test_tied_weight_is_pruned_only_where_named(samples):
    sample = samples("gpt2")
    kwargs = dict(example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    plain = tdhook_fx.compile(sample.model, "save transformer.wte", **kwargs)(sample.example.clone())
    head = tdhook_fx.compile(sample.model, "save transformer.wte\nprune lm_head.weight 50%", **kwargs)(sample.example.clone())
    embed = tdhook_fx.compile(sample.model, "save transformer.wte\nprune transformer.wte.weight 50%", **kwargs)(sample.example.clone())
    # pruning the output head leaves the embedding alone, and the reverse
    torch.testing.assert_close(head["saved", "transformer.wte"], plain["saved", "transformer.wte"])
    assert not torch.allclose(head["logits"], plain["logits"])
    assert not torch.allclose(embed["saved", "transformer.wte"], plain["saved", "transformer.wte"])
    assert sample.model.lm_head.weight is sample.model.transformer.wte.weight


@pytest.mark.parametrize("amount", ["50%", "33%", "1%", "100%", "0%", "7", "0"])
@pytest.mark.parametrize("criterion", ["", " by random(5)"])
def test_rounding_and_counts_match_torch(amount, criterion, samples):
    sample = samples("mlp")
    assert_equivalent(sample.model, f"prune 0.bias {amount}{criterion}\nprune 2.weight {amount}{criterion} along 1", sample.example)


def test_importance_scores_are_a_runtime_value(samples):
    sample = samples("mlp")
    scores = torch.randn(16, 16)
    assert_equivalent(sample.model, "prune 2.weight 25% by $scores", sample.example, values={"scores": scores})
    compiled = tdhook_fx.compile(sample.model, "prune 2.weight 25% by $scores", example=sample.example)
    compiled.bind(scores=torch.randn(3, 3))
    with pytest.raises(tdhook_fx.BindingError, match=r"importance scores of shape \(3, 3\)"):
        compiled(sample.example["input"])


def test_half_of_an_odd_count_rounds_to_even():
    weight = torch.arange(1.0, 16.0)  # 15 weights: 50% is 7.5, rounded half to even: 8
    mask = magnitude_mask(weight, 0.5)
    assert int((mask == 0).sum()) == 8
    assert torch.equal(mask[:8], torch.zeros(8))


def test_random_masks_are_repeatable_with_a_seed():
    weight = torch.randn(6, 4)
    assert torch.equal(random_mask(weight, 0.5, None, 3), random_mask(weight, 0.5, None, 3))
    assert torch.equal(random_mask(weight, 2, 0, 3), random_mask(weight, 2, 0, 3))
    assert int((random_mask(weight, 2, 0, 3).sum(1) == 0).sum()) == 2


def test_pruning_a_whole_module_call_uses_its_other_parameters():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()).eval()
    example = TensorDict(input=torch.randn(2, 2, 5, 5), batch_size=[2])
    assert_equivalent(model, "prune 0.weight 40%\nprune 0.bias 1\nsave 0", example)


def test_the_reference_leaves_the_parameter_order_unchanged(samples):
    # It once put a pruned parameter back at the end of `_parameters`: a model shared by the
    # session then had another parameter order, and a later golden-code test printed other code.
    from tdhook_fx import reference

    sample = samples("mlp")
    before = [name for name, _ in sample.model.named_parameters()]
    reference.run(sample.model, "prune 0.weight 50%\nprune 2.bias 1", sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert [name for name, _ in sample.model.named_parameters()] == before


def test_the_reference_puts_back_every_parameter_of_a_module_pruned_twice(samples):
    # weight and bias of one module, swapped and restored by hooks in turn: neither may be lost
    from tdhook_fx import reference

    sample = samples("mlp")
    before = [name for name, _ in sample.model.named_parameters()]
    reference.run(sample.model, "prune 0.weight 50%\nprune 0.bias 1", sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert [name for name, _ in sample.model.named_parameters()] == before
