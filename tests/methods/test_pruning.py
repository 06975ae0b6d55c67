"""Pruning: tdhook's masks (computed by torch.nn.utils.prune), applied in the graph, never to the model."""

from __future__ import annotations

import pytest
import torch
from tdhook import weights as tdhook_weights

from tdhook_fx import weights
from tdhook_fx.errors import UnknownModulePath
from tests.methods.helpers import assert_same_tensordict, run_both


def weight_magnitude(module_key, parameter_name, parameter):
    return parameter.abs() if parameter_name == "weight" else None


def anti_magnitude(module_key, parameter_name, parameter):
    """Scores unrelated to the weights' own magnitudes (the largest weights go first)."""
    return -parameter.abs() if parameter.dim() == 2 else None


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
        assert not after[key].isnan().any()


@pytest.mark.parametrize(
    "sample_name, kwargs",
    [
        ("mlp", dict(importance_callback=weight_magnitude, amount_to_prune=0.5)),
        ("mlp", dict(importance_callback=anti_magnitude, amount_to_prune=7)),
        (
            "mlp",
            dict(
                importance_callback=weight_magnitude,
                modules_to_prune={"0": (0, 0.4), "2": (1, None)},
                amount_to_prune=0.2,
            ),
        ),
        ("mlp", dict(importance_callback=weight_magnitude, amount_to_prune=0.3, relative_path="2")),
        (
            "gpt2",
            dict(
                importance_callback=anti_magnitude,
                amount_to_prune=0.3,
                skip_modules=lambda name, module: "wte" in name or "lm_head" in name,
            ),
        ),
        (
            "gpt2",
            dict(
                importance_callback=weight_magnitude, modules_to_prune={"transformer.h.0.mlp.c_fc": (1, 0.5)}
            ),
        ),
    ],
)
def test_matches_tdhook_and_leaves_the_model_unchanged(request, sample_name, kwargs):
    sample = request.getfixturevalue(sample_name)
    before = state(sample.model)
    expected, got = run_both(
        tdhook_weights.Pruning(**kwargs), weights.Pruning(**kwargs), sample, sample.example
    )
    assert_same_tensordict(expected, got, rtol=1e-4, atol=1e-5)
    assert_bitwise_equal(before, sample.model)
    assert not torch.allclose(
        got[sample.out_keys[0]],
        sample.model(sample.example[sample.in_keys[0]])
        if sample_name == "mlp"
        else sample.model(sample.example["input_ids"]).logits,
    )


def test_masks_are_tdhooks_and_the_program_names_each_weight(mlp):
    method = weights.Pruning(weight_magnitude, amount_to_prune=0.5)
    with method.prepare(mlp.model) as hooked:
        hooked(mlp.example.clone())
        masks = method.masks
    assert hooked.program.splitlines() == [
        "prune 0.weight 7 by $prune_mask_0",
        "prune 2.weight 5 by $prune_mask_1",
    ]
    assert {k: int((m == 0).sum()) for k, m in masks.items()} == {"0.weight": 7, "2.weight": 5}
    assert method.masks == {}  # forgotten on exit


def test_weights_inside_the_context_are_the_original_ones(mlp):
    before = state(mlp.model)
    with weights.Pruning(weight_magnitude, amount_to_prune=0.9).prepare(mlp.model) as hooked:
        hooked(mlp.example.clone())
        assert_bitwise_equal(
            before, mlp.model
        )  # tdhook zeroes them in place until exit; here they never change


def test_requires_an_amount():
    with pytest.raises(ValueError, match="amount_to_prune"):
        weights.Pruning(weight_magnitude)


def test_unknown_module_to_prune_suggests_one(mlp):
    with pytest.raises(UnknownModulePath, match="has no submodule '3'"):
        with weights.Pruning(weight_magnitude, modules_to_prune={"3": (0, 0.5)}).prepare(mlp.model):
            pass


def test_default_skip_matches_tdhook():
    from torch import nn

    assert weights.Pruning.default_skip("", nn.Linear(2, 2))
    assert weights.Pruning.default_skip("blocks", nn.ModuleList())
    assert not weights.Pruning.default_skip("0", nn.Linear(2, 2))
