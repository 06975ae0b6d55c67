"""Targets: the same selections as tdhook 0.3.0, compiled into indexed DSL sites.

Each method that takes a `Target` in tdhook (ActivationCaching, SteeringVectors,
ActivationAddition, ActivationPatching) is run by both libraries on the same model and inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from tdhook import latent as tdhook_latent
from tdhook.targets import Target as TdhookTarget
from tensordict import TensorDict
from torch import nn

from tdhook_fx import latent
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType
from tdhook_fx.targets import Target
from tests.methods.helpers import assert_same_tensordict, run_both, with_group


def both(*args, **kwargs):
    return TdhookTarget(*args, **kwargs), Target(*args, **kwargs)


def test_json_is_tdhooks_and_round_trips():
    theirs, ours = both("blocks.0", "activation", -1, (1, 3), output_path=("features", 0), occurrences=(1,))
    assert ours.to_json() == theirs.to_json()
    assert Target.from_json(theirs.to_json()) == ours
    assert Target.from_dict(json.loads(ours.to_json())) == ours


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(kind="other"), InvalidArgument),
        (dict(indices=()), InvalidArgument),
        (dict(indices=(True,)), InvalidArgumentType),
        (dict(feature_axis=1.0), InvalidArgumentType),
        (dict(parameter="weight"), InvalidArgument),
        (dict(occurrences=(2, 1)), InvalidArgument),
        (dict(output_path=(object(),)), InvalidArgumentType),
    ],
)
def test_invalid_targets_raise_the_builtin_tdhook_raises(kwargs, error):
    arguments = dict(module_path="0", kind="activation", feature_axis=-1, indices=(0,)) | kwargs
    with pytest.raises(error) as ours:
        Target(**arguments)
    with pytest.raises(Exception) as theirs:
        TdhookTarget(**arguments)
    assert isinstance(ours.value, type(theirs.value))


def test_validate_never_reads_a_property():
    class Model(nn.Module):
        called = False

        @property
        def trap(self):
            Model.called = True
            return nn.Identity()

    with pytest.raises(ValueError, match="does not resolve"):
        Target("trap", "activation", -1, (0,)).validate(Model())
    assert not Model.called


@pytest.mark.parametrize("indices, feature_axis", [((1,), -1), ((0, 2, 3), -1), ((3, 0), -1), ((1,), 1)])
def test_activation_caching_of_a_target_matches_tdhook(mlp, indices, feature_axis):
    theirs, ours = both("0", "activation", feature_axis, indices)
    expected, got = run_both(tdhook_latent.ActivationCaching(theirs), latent.ActivationCaching(ours), mlp, mlp.example)
    assert_same_tensordict(expected, got)


def test_a_target_in_a_tuple_output_matches_tdhook(gpt2):
    theirs, ours = both("transformer.h.1.attn", "activation", -1, (2, 5), output_path=(0,))
    expected, got = run_both(tdhook_latent.ActivationCaching(theirs), latent.ActivationCaching(ours), gpt2, gpt2.example)
    assert_same_tensordict(expected, got)
    with latent.ActivationCaching(ours).prepare(gpt2.model, in_keys=["input_ids"], out_keys=["logits"]) as hooked:
        hooked(gpt2.example.clone())
        assert "save transformer.h.1.attn:out.0[..., $target_idx_0]" in hooked.program


def test_steering_a_target_matches_tdhook(gpt2):
    theirs, ours = both("transformer.h.0.mlp", "activation", -1, (4, 5, 6))

    def steer(module_key, output):
        return output * 3 + 1

    expected, got = run_both(
        tdhook_latent.SteeringVectors([theirs], steer), latent.SteeringVectors([ours], steer), gpt2, gpt2.example
    )
    assert_same_tensordict(expected, got)


def test_activation_addition_of_a_target_matches_tdhook(gpt2):
    theirs, ours = both("transformer.h.1.mlp", "activation", -1, (0, 7))
    td = with_group(gpt2, positive=1, negative=2)
    expected, got = run_both(
        tdhook_latent.ActivationAddition([theirs]), latent.ActivationAddition([ours]), gpt2, td
    )
    assert_same_tensordict(expected, got)


@pytest.mark.parametrize("training", [False, True])
def test_patching_a_target_matches_tdhook(mlp, training):
    theirs, ours = both("0", "activation", -1, (1, 2))
    mlp.model.train(training)
    try:
        td = with_group(mlp, patched=3)
        expected, got = run_both(
            tdhook_latent.ActivationPatching([theirs]), latent.ActivationPatching([ours]), mlp, td
        )
    finally:
        mlp.model.eval()
    assert_same_tensordict(expected, got)


def test_patching_with_a_cache_callback_matches_tdhook(mlp):
    seen = []

    def cache_callback(module, args, output, **kwargs):
        seen.append((type(module).__name__, args[0].shape, kwargs["direction"]))
        return output * 0.5 + args[0].sum(-1, keepdim=True)

    td = with_group(mlp, patched=3)
    expected, got = run_both(
        tdhook_latent.ActivationPatching(["0"], cache_callback=cache_callback),
        latent.ActivationPatching(["0"], cache_callback=cache_callback),
        mlp,
        td,
    )
    assert_same_tensordict(expected, got)
    assert seen[0] == seen[-1] == ("Linear", torch.Size([4, 3]), "fwd")


def test_non_activation_targets_are_refused_where_tdhook_refuses_them():
    gradient = Target("0", "gradient", -1, (0,))
    for make in (latent.ActivationCaching, lambda t: latent.SteeringVectors([t], lambda **kw: None)):
        with pytest.raises(ValueError, match="activation"):
            make(gradient)


def test_plain_tensor_calls_return_the_models_outputs_as_tdhook(mlp):
    x = torch.randn(3)
    with tdhook_latent.ActivationCaching("0").prepare(mlp.model) as hooked:
        expected = hooked(x)
        expected_cache = hooked.hooking_context.cache.clone()
    with latent.ActivationCaching("0").prepare(mlp.model) as hooked:
        got = hooked(x)
        assert_same_tensordict(expected_cache, hooked.hooking_context.cache)
        assert torch.allclose(hooked(input=x), got)
    assert torch.allclose(expected, got)
    assert isinstance(TensorDict(), TensorDict)
