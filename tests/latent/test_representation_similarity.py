"""CKA and information imbalance equal tdhook 0.3.0's and behave as their definitions say."""

import pytest
import tdhook.latent.representation_similarity as theirs
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

import tdhook_fx.latent.representation_similarity as ours
from tdhook_fx.errors import InvalidArgument

NAMES = ["CkaEstimator", "InformationImbalanceEstimator"]


def pair(shape_a, shape_b, seed=0, shared=3):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape_a, generator=generator), torch.randn(shape_b, generator=generator)
    b[..., :shared] += 2 * a[..., :shared]  # B shares some of A's directions
    return a, b


def both(name, a, b, **options):
    data = {"data_a": a, "data_b": b}
    return getattr(ours, name)(**options)(TensorDict(data)), getattr(theirs, name)(**options)(TensorDict(data))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((60, 5), (60, 9)), ((3, 40, 12), (3, 40, 4)), ((2, 2, 20, 64), (2, 2, 20, 64)), ((25, 100), (25, 3))],
)
def test_equal_to_tdhook(name, shape_a, shape_b):
    mine, reference = both(name, *pair(shape_a, shape_b))
    for key in mine.keys():  # noqa: SIM118 (iterating a TensorDict walks its batch)
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-6)


@given(points=st.integers(2, 40), a=st.integers(1, 30), b=st.integers(1, 30), seed=st.integers(0, 2**16), double=st.booleans())
def test_equal_to_tdhook_on_random_pairs(points, a, b, seed, double):
    x, y = pair((points, a), (points, b), seed, shared=min(a, b))
    if double:
        x, y = x.double(), y.double()
    for name in NAMES:
        mine, reference = both(name, x, y)
        for key in mine.keys():  # noqa: SIM118 (iterating a TensorDict walks its batch)
            assert mine[key].dtype == reference[key].dtype
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-4, atol=1e-5, equal_nan=True)


def test_cka_is_invariant_to_rotation_and_scale():
    a = torch.randn(50, 6, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    value = ours.CkaEstimator()(TensorDict(data_a=a, data_b=3 * a @ rotation + 1))["cka"]
    assert value.item() == pytest.approx(1.0, abs=1e-6)
    independent = ours.CkaEstimator()(TensorDict(data_a=a, data_b=torch.randn(50, 6, dtype=torch.float64)))["cka"]
    assert independent.item() < 0.5


def test_cka_of_a_constant_representation_is_nan():
    assert ours.CkaEstimator()(TensorDict(data_a=torch.ones(10, 3), data_b=torch.randn(10, 3)))["cka"].isnan()


def test_information_imbalance_directions():
    """A holds all of B (B is A's first coordinate): A -> B near 0, B -> A far from it."""
    a = torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    out = ours.InformationImbalanceEstimator()(TensorDict(data_a=a, data_b=a[:, :1]))
    assert out["information_imbalance_a_to_b"].item() < 0.15
    assert out["information_imbalance_b_to_a"].item() > 0.45


def test_errors():
    with pytest.raises(InvalidArgument, match="matching sample counts"):
        ours.CkaEstimator()(TensorDict(data_a=torch.randn(5, 2), data_b=torch.randn(6, 2)))
    with pytest.raises(InvalidArgument, match="matching batch shapes"):
        ours.InformationImbalanceEstimator()(TensorDict(data_a=torch.randn(2, 5, 2), data_b=torch.randn(3, 5, 2)))
    with pytest.raises(InvalidArgument, match="at least 2 samples"):
        ours.InformationImbalanceEstimator()(TensorDict(data_a=torch.randn(1, 2), data_b=torch.randn(1, 2)))
    with pytest.raises(NotImplementedError, match="Only 'linear'"):
        ours.CkaEstimator(kernel="rbf")
