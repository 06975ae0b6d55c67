"""The conditioned dimension pipeline: tdhook_fx's cache and steps give tdhook 0.3.0's results."""

import pytest
import tdhook.dimension as their_dimension
import tdhook.latent as their_latent
import tdhook.latent.dimension_estimation as their_estimators
import torch
from tensordict import TensorDict
from tensordict.tensorclass import NonTensorData
from torch import nn

import tdhook_fx.dimension as our_dimension
import tdhook_fx.latent as our_latent
import tdhook_fx.latent.dimension_estimation as estimators
from tdhook_fx.dimension import (
    ActivationSamples,
    AnalysisWorkflow,
    DimensionEstimation,
    DimensionSummary,
    channel_conditioned_samples,
    conditioned_dimension_workflow,
    spatial_conditioned_samples,
)
from tdhook_fx.errors import InvalidArgument
from tdhook_fx.latent import ActivationCaching


@pytest.fixture
def fixture():
    """tdhook's test fixture: a 1x1 convolution whose channels each vary along 3 directions."""
    model = nn.Sequential(nn.Conv2d(3, 4, kernel_size=1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12, dtype=torch.float32).reshape(4, 3, 1, 1) / 10 + 0.1)
    return model, torch.arange(8 * 3 * 2 * 2, dtype=torch.float32).reshape(8, 3, 2, 2) / 20


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)).eval()
    return model, torch.randn(30, 3, 4, 4)


def test_one_capture_pass_and_the_frozen_channel_fixture(fixture):
    model, inputs = fixture
    workflow = conditioned_dimension_workflow(
        ActivationCaching("0", cache_key=("activations", "cache")), "0", channel_conditioned_samples, estimators.TwoNnDimensionEstimator()
    )
    result = workflow(model, TensorDict({"input": inputs}, batch_size=[len(inputs)]))
    torch.testing.assert_close(result["metrics", "dimension"].data, torch.full((4,), 3.0))
    assert result["activations", "cache"]["0"].shape == (8, 4, 2, 2)
    assert result["activations", "samples"].data.shape == (4, 8, 4)
    summary = result["metrics", "dimension_summary"].data
    assert summary["count"].item() == 4
    torch.testing.assert_close(summary["mean"], torch.tensor(3.0))
    torch.testing.assert_close(summary["std"], torch.tensor(0.0))
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


ESTIMATORS = ["TwoNnDimensionEstimator", "LocalKnnDimensionEstimator", "LocalPcaDimensionEstimator", "CaPcaDimensionEstimator"]


@pytest.mark.parametrize(
    ("name", "transform", "dims"),
    [(name, "channel_conditioned_samples", None) for name in ESTIMATORS]
    + [(name, "spatial_conditioned_samples", dims) for name, dims in zip(ESTIMATORS[1:], (0, -1, 0))],
)
def test_equal_to_tdhook_on_a_cnn(cnn, name, transform, dims):
    """tdhook_fx's compiled ActivationCaching and steps against tdhook's hooks and steps."""
    model, x = cnn
    if name == "TwoNnDimensionEstimator" and dims is not None:
        dims = None  # one dimension per condition: nothing to reduce but all
    results = []
    for dimension, latent, family in ((our_dimension, our_latent, estimators), (their_dimension, their_latent, their_estimators)):
        workflow = dimension.conditioned_dimension_workflow(
            latent.ActivationCaching("2", cache_key=("activations", "cache")), "2",
            getattr(dimension, transform), getattr(family, name)(), summary_dims=dims,
        )
        with torch.no_grad():  # tdhook's CA-PCA cannot read activations that require grad
            results.append(workflow(model, TensorDict(input=x, batch_size=[len(x)])))
    mine, reference = results
    torch.testing.assert_close(mine["activations", "cache", "2"], reference["activations", "cache", "2"])
    torch.testing.assert_close(mine["metrics", "dimension"].data, reference["metrics", "dimension"].data, equal_nan=True)
    ours_summary, their_summary = mine["metrics", "dimension_summary"].data, reference["metrics", "dimension_summary"].data
    for key in ("count", "mean", "std"):
        assert ours_summary[key].dtype == their_summary[key].dtype
        torch.testing.assert_close(ours_summary[key], their_summary[key], equal_nan=True)


def test_the_selectors_reshape_as_documented(cnn):
    activations = torch.randn(8, 4, 3, 2)
    torch.testing.assert_close(channel_conditioned_samples(activations), activations.permute(1, 0, 2, 3).reshape(4, 8, 6))
    torch.testing.assert_close(spatial_conditioned_samples(activations), activations.permute(2, 3, 0, 1).reshape(6, 8, 4))
    for ours, theirs in ((channel_conditioned_samples, their_dimension.channel_conditioned_samples),
                         (spatial_conditioned_samples, their_dimension.spatial_conditioned_samples)):
        assert torch.equal(ours(activations), theirs(activations))
    with pytest.raises(InvalidArgument, match="Channel-conditioned"):
        channel_conditioned_samples(torch.ones(2, 3))
    with pytest.raises(InvalidArgument, match="Spatial-conditioned"):
        spatial_conditioned_samples(torch.ones(2, 3, 4))


def test_several_cached_layers_feed_independent_steps():
    first = torch.randn(8, 4, 2, 2)
    artifacts = TensorDict({"activations": {"cache": {"first": first, "second": first + 1}}}, batch_size=[8])
    workflow = AnalysisWorkflow(
        ActivationSamples("first", channel_conditioned_samples, out_key=("activations", "first")),
        ActivationSamples("second", spatial_conditioned_samples, out_key=("activations", "second")),
        DimensionEstimation(estimators.LocalKnnDimensionEstimator(k=2), in_key=("activations", "first"), out_key="knn"),
        DimensionSummary(in_key="knn", out_key="summary", dims=1),
    )
    result = workflow(nn.Identity(), artifacts)
    assert isinstance(result.get(("activations", "first")), NonTensorData)
    assert result["activations", "second"].data.shape == (4, 8, 4)
    assert result["summary"].data["mean"].shape == (4,)


def test_a_summary_counts_only_finite_dimensions():
    artifacts = TensorDict({"d": NonTensorData(torch.tensor([[1.0, float("nan"), 3.0], [float("nan")] * 3]), batch_size=[])})
    summary = DimensionSummary(in_key="d", out_key="s", dims=1)(artifacts)["s"].data
    assert summary["count"].tolist() == [2, 0]
    torch.testing.assert_close(summary["mean"], torch.tensor([2.0, float("nan")]), equal_nan=True)
    torch.testing.assert_close(summary["std"], torch.tensor([1.0, float("nan")]), equal_nan=True)


def test_errors():
    with pytest.raises(TypeError, match="activation_key"):
        ActivationSamples((), lambda value: value)
    with pytest.raises(TypeError, match="cache_key and out_key"):
        ActivationSamples("value", lambda value: value, cache_key=())
    with pytest.raises(TypeError, match="in_key and out_key"):
        DimensionEstimation(estimators.TwoNnDimensionEstimator(), in_key=())
    with pytest.raises(TypeError, match="in_key and out_key"):
        DimensionSummary(out_key=())
    with pytest.raises(ValueError, match="configure cache_key"):
        conditioned_dimension_workflow(ActivationCaching("0"), "0", channel_conditioned_samples, estimators.TwoNnDimensionEstimator())
    with pytest.raises(ValueError, match="unique valid dimensions"):
        DimensionSummary(dims=(0, 0))(TensorDict({("metrics", "dimension"): torch.ones(3)}))
    with pytest.raises(TypeError, match="step 0 must be a configured method"):
        AnalysisWorkflow(lambda td: td)
