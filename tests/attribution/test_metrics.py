"""Infidelity and sensitivity: tdhook's numbers for tdhook's inputs, and what they mean."""

import pytest
import tdhook.attribution as tdhook_attribution
import tdhook.metrics as tdhook_metrics
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import IntegratedGradients, Saliency
from tdhook_fx.metrics import InfidelityMetric, SensitivityMetric
from tests.attribution.models import inputs, mlp


@pytest.fixture
def td():
    return TensorDict({"input": inputs("mlp")}, batch_size=[5])


def scored(method, model, td, metric, seed=0):
    with method.prepare(model) as hooked:
        result = hooked(td.clone())
        torch.manual_seed(seed)
        return metric(hooked, result)


def test_same_numbers_as_tdhook(td):
    """tdhook needs its intermediate keys kept; ours reads the outputs with a forward pass."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    for ours, theirs in [(InfidelityMetric(4), tdhook_metrics.InfidelityMetric(4)), (SensitivityMetric(0.1), tdhook_metrics.SensitivityMetric(0.1))]:
        mine = scored(Saliency(), model, td, ours)
        expected = scored(tdhook_attribution.Saliency(clean_intermediate_keys=False), model, td, theirs)
        torch.testing.assert_close(mine["input"], expected["input"])


def test_a_faithful_attribution_scores_zero():
    """The gradient of a linear model predicts every output change exactly and never moves."""
    torch.manual_seed(1)
    linear = nn.Linear(6, 1)
    td = TensorDict({"input": inputs("mlp")}, batch_size=[5])
    infidelity = scored(Saliency(), linear, td, InfidelityMetric(8))
    sensitivity = scored(Saliency(), linear, td, SensitivityMetric())
    assert infidelity["input"].shape == (5,) and infidelity["input"].max() < 1e-10
    assert sensitivity["input"].abs().max() < 1e-6


def test_a_noisy_attribution_scores_worse(td):
    model = mlp()
    one_output = nn.Sequential(model, nn.Linear(4, 1)).eval()
    good = scored(Saliency(), one_output, td, InfidelityMetric(8))
    noisy = Saliency(init_attr_grads=lambda targets, _: TensorDict(output=torch.randn_like(targets["output"]) * 5, batch_size=targets.batch_size))
    bad = scored(noisy, one_output, td, InfidelityMetric(8))
    assert bad["input"].mean() > 10 * good["input"].mean()


def test_infidelity_of_integrated_gradients_uses_the_outputs_at_the_inputs(td):
    td["baseline", "input"] = torch.zeros(5, 6)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    result = scored(IntegratedGradients(n_steps=16), model, td, InfidelityMetric(4))
    assert result["input"].shape == (5,) and torch.isfinite(result["input"]).all()


def test_model_passes_and_arguments(td):
    with Saliency().prepare(mlp()) as hooked:
        assert InfidelityMetric(3).additional_model_passes(hooked) == 3
        assert SensitivityMetric().additional_model_passes(hooked) == 1
    with pytest.raises(ValueError, match="positive"):
        InfidelityMetric(0)
    with pytest.raises(TypeError, match="must be an int"):
        InfidelityMetric(2.5)
    with pytest.raises(ValueError, match="non-negative"):
        SensitivityMetric(-1)


def test_a_module_without_outputs_needs_them_in_the_data():
    class Plain(nn.Module):
        in_keys = ("input",)

        def forward(self, td):
            return td

    with pytest.raises(KeyError, match="clean_intermediate_keys=False"):
        InfidelityMetric(1)(Plain(), TensorDict({"input": torch.ones(2, 3), ("attr", "input"): torch.ones(2, 3)}, batch_size=[2]))
