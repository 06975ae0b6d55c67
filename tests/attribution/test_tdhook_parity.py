"""The same calls give tdhook 0.3.0's results and keys (tdhook_fx is a drop-in replacement)."""

import pytest
import tdhook.attribution as tdhook
import torch
from tdhook.attribution.grad_cam import DimsConfig as TdhookDimsConfig
from tensordict import TensorDict

from tdhook_fx import attribution as ours
from tests.attribution.models import attribute, first_output, inputs, mlp

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def both(make, model, td, **prepare):
    """(ours, tdhook's) results of the method `make(module)` builds."""
    return attribute(make(ours), model, td, **prepare), attribute(make(tdhook), model, td, **prepare)


def assert_same(mine: TensorDict, theirs: TensorDict, keys=None):
    keys = keys or sorted(theirs.keys(include_nested=True, leaves_only=True), key=str)
    assert sorted(mine.keys(include_nested=True, leaves_only=True), key=str) == sorted(keys, key=str)
    for key in keys:
        torch.testing.assert_close(mine[key], theirs[key], **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def model():
    return mlp()


@pytest.fixture
def td():
    x = inputs("mlp")
    return TensorDict({"input": x}, batch_size=[5])


def test_saliency_variants(model, td):
    for options in [{}, {"absolute": True}, {"multiply_by_inputs": True}, {"clean_intermediate_keys": False}]:
        mine, theirs = both(lambda m, options=options: m.Saliency(init_attr_targets=first_output, **options), model, td)
        assert_same(mine, theirs)


def test_latent_saliency_between_modules(model, td):
    def target(outputs, _):
        return TensorDict(o=outputs["4"][..., 1], batch_size=outputs.batch_size)

    options = {"input_modules": ["0", "2"], "target_modules": ["4"], "use_inputs": False, "use_outputs": False, "init_attr_targets": target}
    mine, theirs = both(lambda m: m.Saliency(multiply_by_inputs=True, **options), model, td)
    assert_same(mine, theirs)


def test_inputs_and_modules_together(model, td):
    mine, theirs = both(lambda m: m.Saliency(input_modules=["2"], init_attr_targets=first_output), model, td)
    assert_same(mine, theirs)


def test_output_grad_callbacks(model, td):
    def halve(module, grad_output, value, direction):
        return (grad_output[0] * 0.5,)

    mine, theirs = both(lambda m: m.Saliency(init_attr_targets=first_output, output_grad_callbacks={"2": halve}), model, td)
    assert_same(mine, theirs)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients(model, td, method):
    td["baseline", "input"] = torch.randn(5, 6) * 0.1
    options = {"init_attr_targets": first_output, "n_steps": 9, "method": method, "multiply_by_inputs": True, "compute_convergence_delta": True}
    mine, theirs = both(lambda m: m.IntegratedGradients(**options), model, td)
    # tdhook also leaves its intermediate keys (with the steps dim) behind: compare the results
    assert_same(mine, theirs, keys=["input", ("baseline", "input"), ("attr", "input"), "convergence_delta"])


def test_integrated_gradients_with_two_inputs_and_two_targets():
    torch.manual_seed(0)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(2, 4)

        def forward(self, a, b):
            return torch.tanh(self.a(a) * self.b(b))

    def two_targets(outputs, _):
        return TensorDict(first=outputs["output"][..., 0], last=outputs["output"][..., -1], batch_size=outputs.batch_size)

    td = TensorDict({"a": torch.randn(4, 3), "b": torch.randn(4, 2)}, batch_size=[4])
    td["baseline"] = TensorDict(a=torch.zeros(4, 3), b=torch.zeros(4, 2), batch_size=[4])
    options = {"init_attr_targets": two_targets, "n_steps": 10, "multiply_by_inputs": True, "compute_convergence_delta": True}
    mine, theirs = both(lambda m: m.IntegratedGradients(**options), Two(), td, in_keys=["a", "b"])
    keys = ["a", "b", ("baseline", "a"), ("baseline", "b"), ("attr", "a"), ("attr", "b"), "convergence_delta"]
    assert_same(mine, theirs, keys=keys)


def test_grad_cam_on_the_zoo_cnn(samples):
    sample = samples("cnn")  # batch norm, in-place ReLU, pooling

    def configs(module):
        dims = ours.DimsConfig if module is ours else TdhookDimsConfig
        return {"4": dims((2, 3), (1,)), "6": dims()}

    mine, theirs = both(lambda m: m.GradCAM(configs(m), init_attr_targets=first_output), sample.model, sample.example)
    assert_same(mine, theirs)


def test_guided_backpropagation(model, td):
    for options in [{}, {"multiply_by_inputs": True}, {"classes_to_skip": (torch.nn.Linear,)}]:
        mine, theirs = both(
            lambda m, options=options: m.GuidedBackpropagation(init_attr_targets=first_output, **options), model, td
        )
        assert_same(mine, theirs)


def test_activation_maximisation(model, td):
    def unit(outputs, _):
        return TensorDict(o=outputs["2"][..., 3], batch_size=outputs.batch_size)

    mine, theirs = both(lambda m: m.ActivationMaximisation(["2"], alpha=0.2, n_steps=6, max_value=1.5, init_attr_targets=unit), model, td)
    assert_same(mine, theirs)


@pytest.mark.slow
def test_saliency_on_gpt2_embedding_output(samples):
    sample = samples("gpt2")

    def last_logit(outputs, _):
        return TensorDict(o=outputs["logits"][..., -1, 5], batch_size=outputs.batch_size)

    options = {"use_inputs": False, "input_modules": ["transformer.wte"], "init_attr_targets": last_logit}
    mine, theirs = both(lambda m: m.Saliency(**options), sample.model, sample.example, in_keys=["input_ids"], out_keys=["logits"])
    assert_same(mine, theirs)


def test_init_attr_targets_with_labels(model, td):
    from functools import partial

    td["baseline", "input"] = torch.zeros(5, 6)
    td["label"] = TensorDict(output=torch.tensor([0, 1, 2, 3, 0]), batch_size=[5])  # tdhook's layout

    def make(module):
        targets = partial(module.IntegratedGradients.init_attr_targets_with_labels, selected_out_keys=["output"])
        return module.IntegratedGradients(init_attr_targets=targets, additional_init_keys=["label"], n_steps=6)

    mine, theirs = both(make, model, td)
    torch.testing.assert_close(mine["attr", "input"], theirs["attr", "input"], **TOLERANCE)
    td["label"] = torch.tensor([0, 1, 2, 3, 0])  # a plain tensor works here too
    plain = attribute(make(ours), model, td)
    torch.testing.assert_close(plain["attr", "input"], theirs["attr", "input"], **TOLERANCE)
