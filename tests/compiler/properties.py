"""The core property, shared by the equivalence and gradient tests: hypothesis draws a program
over the sample's real sites and inputs to run it on; the compiled module must agree with the
hook reference on every output and saved value (and, with `backward`, every gradient)."""

from hypothesis import given, settings

import tdhook_fx
from tdhook_fx.testing import assert_equivalent, inputs_like, programs_for
from tests import zoo


def check_against_reference(sample, *, grads: bool = False, backward=None, examples: int | None = None):
    """`examples` caps the draws under the default profile; a thorough profile draws its own."""
    table = tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    sources = zoo.source_inputs(sample)
    default = settings().max_examples <= 20
    draws = examples if examples is not None and default else settings().max_examples

    @settings(max_examples=draws)
    @given(programs_for(table, grads=grads), inputs_like(sample.example, sample.in_keys))
    def check(drawn, inputs):
        assert_equivalent(
            sample.model,
            drawn.text,
            sample.example,
            in_keys=sample.in_keys,
            out_keys=sample.out_keys,
            values=drawn.values,
            sources={"patched": sources} if drawn.patches else None,
            inputs=inputs,
            backward=backward,
            rtol=1e-4,
            atol=1e-4,
        )

    check()
