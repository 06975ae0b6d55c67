"""ActivationPatching: tdhook's clean and patched outputs, from one fused compiled pass."""

from __future__ import annotations

import pytest
import torch
from tdhook import latent as tdhook_latent
from torch import nn

from tdhook_fx import latent
from tdhook_fx.errors import MissingInputKey, PatchShapeError
from tdhook_fx.zoo import Sample
from tests.methods.helpers import assert_same_tensordict, run_both, with_group


def mix(module_key, output, output_to_patch):
    return 0.25 * output + 0.75 * output_to_patch


@pytest.mark.parametrize("patch_fn", [None, mix], ids=["replace", "patch_fn"])
@pytest.mark.parametrize(
    "sample_name, paths",
    [
        ("mlp", ["1"]),
        ("mlp", ["0", "2"]),
        ("gpt2", ["transformer.h.0.mlp"]),
        ("gpt2", ["transformer.h.0", "transformer.h.1.mlp"]),
    ],
)
def test_matches_tdhook(request, sample_name, paths, patch_fn):
    sample = request.getfixturevalue(sample_name)
    td = with_group(sample, patched=1)
    expected, got = run_both(
        tdhook_latent.ActivationPatching(paths, patch_fn=patch_fn),
        latent.ActivationPatching(paths, patch_fn=patch_fn),
        sample,
        td,
    )
    assert_same_tensordict(expected, got, rtol=1e-4, atol=1e-5)


def test_one_fused_pass_on_the_stacked_inputs(gpt2):
    with latent.ActivationPatching(["transformer.h.0.mlp"]).prepare(
        gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
    ) as hooked:
        hooked(with_group(gpt2, patched=1))
    assert hooked.program == "set transformer.h.0.mlp = $patch_fn_0(value)"
    assert hooked.code.count("    transformer_h_0_mlp_c_fc = ") == 1  # one model pass, not two


def test_training_mode_patches_from_a_separate_source_run():
    """Where the batch must not be stacked (training mode), the compiler's `patch ... from` is used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).train()
    sample = Sample(model, with_group(Sample(model, _example()), patched=3))
    paths = ["1"]
    expected, got = run_both(
        tdhook_latent.ActivationPatching(paths), latent.ActivationPatching(paths), sample, sample.example
    )
    assert_same_tensordict(expected, got, rtol=1e-4, atol=1e-5)


def _example():
    from tensordict import TensorDict

    return TensorDict(input=torch.randn(5, 3), batch_size=[5])


def test_missing_patched_inputs_are_named(mlp):
    with latent.ActivationPatching(["1"]).prepare(mlp.model) as hooked:
        with pytest.raises(MissingInputKey, match=r"\('patched', 'input'\)") as error:
            hooked(mlp.example.clone())
    assert "hint: put the source inputs at td[('patched', 'input')]" in str(error.value)


def test_patch_fn_of_the_wrong_shape_is_refused(mlp):
    wrong = lambda module_key, output, output_to_patch: output[:, :3]
    with latent.ActivationPatching(["0"], patch_fn=wrong).prepare(mlp.model) as hooked:
        with pytest.raises(
            PatchShapeError, match=r"patch_fn returned \(4, 3\) at 0, whose activation has shape \(4, 5\)"
        ):
            hooked(with_group(mlp, patched=1))
    broadcastable = lambda module_key, output, output_to_patch: output[0]
    with latent.ActivationPatching(["0"], patch_fn=broadcastable).prepare(mlp.model) as hooked:
        with pytest.raises(PatchShapeError):
            hooked(with_group(mlp, patched=1))
