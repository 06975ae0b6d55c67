"""Runtime values given per call next to a TensorDict: non-tensor entries and keywords."""

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx.errors import BindingError

PROGRAM = "set 0[:, $pos] = 0\nsteer 1 *= $scale"


@pytest.fixture
def compiled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    x = torch.randn(5, 4)
    cm = tdhook_fx.compile(model, PROGRAM, example=TensorDict(input=x, batch_size=[5]), in_keys=["input"], out_keys=["out"])
    return model, x, cm


def _want(model, x, pos, scale):
    return reference.run(model, PROGRAM, (x,), in_keys=["input"], out_keys=["out"], values={"pos": pos, "scale": scale})["out"]


@pytest.mark.parametrize("pos, scale", [(0, 2.0), (5, -1.0), (-1, 0.5)])
def test_a_non_tensor_entry_is_one_value_for_the_whole_call(compiled, pos, scale):
    model, x, cm = compiled
    td = TensorDict(input=x, batch_size=[5])
    td.set_non_tensor("pos", pos)
    td.set_non_tensor("scale", scale)
    torch.testing.assert_close(cm(td)["out"], _want(model, x, pos, scale))


def test_keywords_next_to_a_tensordict_win_over_its_entries(compiled):
    model, x, cm = compiled
    td = TensorDict(input=x, batch_size=[5])
    td.set_non_tensor("pos", 1)
    torch.testing.assert_close(cm(td, pos=3, scale=2.0)["out"], _want(model, x, 3, 2.0))
    assert not cm.bound_values()  # nothing stays bound after the call


def test_one_value_per_call_travels_with_a_stacked_tensordict(compiled):
    model, x, cm = compiled
    td = torch.stack([TensorDict(input=x[i], batch_size=[]).set_non_tensor("pos", 2) for i in range(5)])
    torch.testing.assert_close(cm(td, scale=1.0)["out"], _want(model, x, 2, 1.0))


def test_rows_that_disagree_and_unknown_names_are_refused(compiled):
    _, x, cm = compiled
    td = torch.stack([TensorDict(input=x[i], batch_size=[]).set_non_tensor("pos", i) for i in range(5)])
    with pytest.raises(BindingError, match="differs between the rows"):
        cm(td, scale=1.0)
    with pytest.raises(BindingError, match="did you mean 'pos'"):
        cm(TensorDict(input=x, batch_size=[5]), poss=1, scale=1.0)


def test_a_non_tensor_function_entry_is_called(compiled):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    x = torch.randn(5, 4)
    cm = tdhook_fx.compile(model, "set 0 = $f(value)", example=TensorDict(input=x, batch_size=[5]), in_keys=["input"], out_keys=["out"])
    td = TensorDict(input=x, batch_size=[5])
    td.set_non_tensor("f", lambda value: value * 0)
    torch.testing.assert_close(cm(td)["out"], model[1].bias.expand(5, 3))
