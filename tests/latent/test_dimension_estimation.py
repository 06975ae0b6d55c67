"""The intrinsic-dimension estimators equal tdhook 0.3.0's on fixed data and find known dimensions."""

import pytest
import tdhook.latent.dimension_estimation as theirs
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

import tdhook_fx.latent.dimension_estimation as ours
from tdhook_fx.errors import InvalidArgument
from tests.latent.data import curved, flat, with_duplicates

ESTIMATORS = {
    "TwoNnDimensionEstimator": [{}, {"return_xy": True}, {"eps": 1e-3}],
    "LocalKnnDimensionEstimator": [{}, {"k": 4}, {"k": 9, "eps": 0.0}],
    "LocalPcaDimensionEstimator": [{}, {"k": 6}, {"criterion": "ratio"}, {"criterion": "ratio", "alpha": 0.2, "k": 12}],
    "CaPcaDimensionEstimator": [{}, {"k": 5}, {"k": 15}],
}
CASES = [(name, options) for name, many in ESTIMATORS.items() for options in many]


def run(module, name: str, options: dict, data: torch.Tensor, **keys) -> TensorDict:
    return getattr(module, name)(**options, **keys)(TensorDict(data=data))


def assert_same(mine: TensorDict, reference: TensorDict) -> None:
    assert set(mine.keys()) == set(reference.keys())
    for key in reference.keys():  # noqa: SIM118 (iterating a TensorDict walks its batch)
        assert mine[key].dtype == reference[key].dtype and mine[key].shape == reference[key].shape, key
        torch.testing.assert_close(mine[key], reference[key], rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("name", "options", "data"),
    [(name, options, data) for name, options in CASES for data in ("curved", "duplicates")]
    + [(name, many[0], data) for name, many in ESTIMATORS.items() for data in ("one dataset", "float64")],
)
def test_equal_to_tdhook(name, options, data):
    points = {
        "curved": lambda: curved(),
        "duplicates": lambda: with_duplicates(curved(seed=3)),
        "one dataset": lambda: flat(),
        "float64": lambda: curved(datasets=3, points=40, seed=4).double(),
    }[data]()
    assert_same(run(ours, name, options, points), run(theirs, name, options, points))


@settings(max_examples=10)
@given(points=st.integers(12, 60), features=st.integers(1, 9), seed=st.integers(0, 2**16), k=st.sampled_from(["auto", 2, 3, 5]))
def test_equal_to_tdhook_on_random_clouds(points, features, seed, k):
    data = torch.randn(points, features, generator=torch.Generator().manual_seed(seed))
    for name in ESTIMATORS:
        options = {} if name == "TwoNnDimensionEstimator" else {"k": k}
        assert_same(run(ours, name, options, data), run(theirs, name, options, data))


def test_known_dimensions():
    """A flat 2-d torus in R^4 (no boundary to bias TwoNN; curved in R^4), rotated into R^8."""
    angles = torch.rand(400, 2, generator=torch.Generator().manual_seed(5)) * 2 * torch.pi
    torus = torch.cat([angles.cos(), angles.sin(), torch.zeros(400, 4)], dim=1)
    torus = torus @ torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(6))).Q
    assert run(ours, "TwoNnDimensionEstimator", {}, torus)["dimension"].item() == pytest.approx(2, abs=0.1)
    assert run(ours, "LocalKnnDimensionEstimator", {}, torus)["dimension"].nanmedian().item() == pytest.approx(2, abs=0.2)
    # local PCA sees the curvature as two more dimensions; CA-PCA corrects for it
    assert run(ours, "LocalPcaDimensionEstimator", {"k": 10}, torus)["dimension"].median().item() == 4
    assert run(ours, "CaPcaDimensionEstimator", {"k": 10}, torus)["dimension"].median().item() == 2
    assert run(ours, "LocalPcaDimensionEstimator", {"k": 10}, flat(points=300))["dimension"].median().item() == 2


def test_nested_keys_and_batch_dims():
    data = curved(datasets=6, points=30).reshape(2, 3, 30, -1)
    out = ours.TwoNnDimensionEstimator(in_key=("acts", "x"), out_key=("dims", "id"), return_xy=True)(TensorDict({("acts", "x"): data}))
    assert out["dims", "id"].shape == (2, 3) and out["dims", "id_x"].shape == (2, 3, 29)
    assert ours.LocalKnnDimensionEstimator(k=3)(TensorDict(data=data))["dimension"].shape == (2, 3, 30)


def test_errors():
    with pytest.raises(InvalidArgument, match="At least 3 points"):
        ours.TwoNnDimensionEstimator()(TensorDict(data=torch.randn(2, 4)))
    with pytest.raises(InvalidArgument, match="At least 3 valid points"):
        ours.TwoNnDimensionEstimator()(TensorDict(data=torch.zeros(5, 3)))
    with pytest.raises(InvalidArgument, match="k must be greater than 1"):
        ours.LocalKnnDimensionEstimator(k=1)
    with pytest.raises(TypeError, match="k must be an int or 'auto'"):
        ours.LocalPcaDimensionEstimator(k=2.5)
    with pytest.raises(InvalidArgument, match="Unknown criterion"):
        ours.LocalPcaDimensionEstimator(criterion="elbow")
    with pytest.raises(InvalidArgument, match=r"At least 2k\+1 points required for local KNN \(k=5\), got 10"):
        ours.LocalKnnDimensionEstimator(k=5)(TensorDict(data=torch.randn(10, 3)))
    with pytest.raises(InvalidArgument, match=r"At least k\+2 points required for CA-PCA"):
        ours.CaPcaDimensionEstimator(k=9)(TensorDict(data=torch.randn(10, 3)))
    with pytest.raises(InvalidArgument, match=r"expects data of shape \(N, D\)"):
        ours.LocalPcaDimensionEstimator(k=1)(TensorDict(data=torch.randn(10)))


def test_repr_names_the_keys():
    text = repr(ours.LocalPcaDimensionEstimator(k=4, criterion="ratio"))
    assert "in_keys=['data']" in text and "criterion='ratio'" in text and "k=4" in text
