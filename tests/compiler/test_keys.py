"""Keys a TensorDict call writes never collide with each other or nest into the inputs."""

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx.errors import BindingError

MODEL = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
X = torch.randn(3, 4)


def _compile(in_keys, out_keys, program="save 0 as a"):
    td = TensorDict({k: X for k in in_keys}, batch_size=[3])
    return tdhook_fx.compile(MODEL, program, example=td, in_keys=in_keys, out_keys=out_keys), td


@pytest.mark.parametrize(
    "in_keys, out_keys",
    [
        (["saved"], ["out"]),  # was a raw KeyError from tensordict at the first call
        (["input"], ["saved"]),  # likewise
        (["input"], [("saved", "a")]),  # was silently overwritten by the saved value
    ],
)
def test_colliding_keys_are_refused_at_compile_time(in_keys, out_keys):
    with pytest.raises(BindingError, match="collides with"):
        _compile(in_keys, out_keys)


@pytest.mark.parametrize("in_keys, out_keys", [(["input"], ["input"]), ([("saved", "x")], ["out"])])
def test_writing_over_an_input_or_beside_it_is_allowed(in_keys, out_keys):
    cm, td = _compile(in_keys, out_keys)
    out = cm(td)
    torch.testing.assert_close(out[out_keys[0]], MODEL(X))
    torch.testing.assert_close(out["saved", "a"], MODEL[0](X))
