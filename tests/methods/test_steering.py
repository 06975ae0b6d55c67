"""SteeringVectors and ActivationAddition: tdhook's results, from compiled programs."""

from __future__ import annotations

import pytest
import torch
from tdhook import latent as tdhook_latent

from tdhook_fx import latent
from tdhook_fx.errors import MissingInputKey, UnknownModulePath
from tests.methods.helpers import assert_same_tensordict, run_both, with_group


@pytest.mark.parametrize(
    "sample_name, paths", [("mlp", ["0", "2"]), ("gpt2", ["transformer.h.0.mlp", "transformer.h.1"])]
)
def test_steering_vectors_match_tdhook(request, sample_name, paths):
    sample = request.getfixturevalue(sample_name)
    calls = []

    def steer_fn(module_key, output):
        calls.append((module_key, tuple(output.shape)))
        return output + 0.5 * torch.ones_like(output).cumsum(-1)

    expected, got = run_both(
        tdhook_latent.SteeringVectors(paths, steer_fn),
        latent.SteeringVectors(paths, steer_fn),
        sample,
        sample.example,
    )
    assert_same_tensordict(expected, got)
    assert calls[: len(paths)] == calls[len(paths) :]  # the same keys and shapes, in the same order
    assert [key for key, _ in calls[: len(paths)]] == paths


def test_steer_fn_runs_inside_the_compiled_graph(mlp):
    vector = torch.randn(5)
    with latent.SteeringVectors(["0"], lambda module_key, output: output + 2 * vector).prepare(
        mlp.model
    ) as hooked:
        td = hooked(mlp.example.clone())
    assert hooked.program == "set 0 = $steer_fn_0(value)"
    assert "steer_fn_0" in hooked.code
    model = mlp.model
    torch.testing.assert_close(td["output"], model[2](model[1](model[0](mlp.example["input"]) + 2 * vector)))


def test_steer_fn_returning_none_keeps_the_output(mlp):
    with latent.SteeringVectors(["1"], lambda module_key, output: None).prepare(mlp.model) as hooked:
        td = hooked(mlp.example.clone())
    torch.testing.assert_close(td["output"], mlp.model(mlp.example["input"]))


@pytest.mark.parametrize(
    "sample_name, paths", [("mlp", ["0", "1"]), ("gpt2", ["transformer.h.0.mlp", "transformer.h.1"])]
)
def test_activation_addition_matches_tdhook(request, sample_name, paths):
    sample = request.getfixturevalue(sample_name)
    td = with_group(sample, positive=1, negative=2)
    for key in sample.in_keys:
        del td[key]
    expected, got = run_both(
        tdhook_latent.ActivationAddition(paths), latent.ActivationAddition(paths), sample, td
    )
    assert_same_tensordict(expected, got)
    assert got.batch_size == torch.Size([])


def test_activation_addition_stops_after_the_last_site(gpt2):
    with latent.ActivationAddition(["transformer.h.0.mlp"]).prepare(
        gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
    ) as hooked:
        hooked(with_group(gpt2, positive=1, negative=2))
    assert hooked.program.splitlines() == ["save transformer.h.0.mlp as saved_0", "stop transformer.h.0.mlp"]
    assert "ln_f" not in hooked.code and "h_1" not in hooked.code  # nothing after the site is computed


def test_extracted_vector_steers_like_tdhook(gpt2):
    """The documented round trip: extract with ActivationAddition, apply with SteeringVectors."""
    td = with_group(gpt2, positive=1, negative=2)
    path = "transformer.h.0.mlp"
    keys = dict(in_keys=["input_ids"], out_keys=["logits"])
    with latent.ActivationAddition([path]).prepare(gpt2.model, **keys) as hooked:
        vector = hooked(td.clone())[("steer", path)]
    steer = lambda module_key, output: output + 4 * vector
    expected, got = run_both(
        tdhook_latent.SteeringVectors([path], steer),
        latent.SteeringVectors([path], steer),
        gpt2,
        gpt2.example,
    )
    assert_same_tensordict(expected, got)
    assert not torch.allclose(got["logits"], gpt2.model(gpt2.example["input_ids"]).logits)


def test_missing_positive_inputs_are_named(mlp):
    td = with_group(mlp, negative=2)
    with latent.ActivationAddition(["0"]).prepare(mlp.model) as hooked:
        with pytest.raises(MissingInputKey, match=r"\('positive', 'input'\)") as error:
            hooked(td)
    assert "hint: put the positive inputs at td[('positive', 'input')]" in str(error.value)


def test_unknown_path_suggests_real_ones(gpt2):
    with (
        latent.SteeringVectors(["transformer.h.0.mpl"], lambda module_key, output: output).prepare(
            gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
        ) as hooked,
        pytest.raises(UnknownModulePath, match="did you mean 'transformer.h.0.mlp'"),
    ):
        hooked(gpt2.example.clone())
