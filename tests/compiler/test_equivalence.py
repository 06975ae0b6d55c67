"""The core property: a compiled program does exactly what the hook reference does.

Hypothesis draws a valid program over each zoo model's real sites (save, set, steer, patch,
prune, stop, with indices and runtime values); every output and saved value must match.
"""

import pytest
from hypothesis import given

import tdhook_fx
from tdhook_fx.testing import assert_equivalent, programs_for
from tests import zoo

MODELS = ["mlp", "cnn", "tiny_transformer", "gpt2", "bert", "llama", "minilm"]


@pytest.mark.parametrize("name", MODELS)
def test_compiled_program_equals_hook_reference(name, samples):
    sample = samples(name)
    table = tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    sources = zoo.source_inputs(sample)

    @given(programs_for(table))
    def check(drawn):
        assert_equivalent(
            sample.model,
            drawn.text,
            sample.example,
            in_keys=sample.in_keys,
            out_keys=sample.out_keys,
            values=drawn.values,
            sources={"patched": sources} if drawn.patches else None,
            rtol=1e-4,
            atol=1e-4,
        )

    check()
