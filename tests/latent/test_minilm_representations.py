"""The README's analysis of the pretrained all-MiniLM-L6-v2 (examples/minilm_representations.py):
token representations cached by tdhook_fx give tdhook 0.3.0's dimensions and CKA matrix."""

import importlib.util
from pathlib import Path

import pytest
import tdhook.latent.dimension_estimation as their_dimensions
import tdhook.latent.representation_similarity as their_similarity
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[2] / "examples" / "minilm_representations.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("minilm_representations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dimensions_and_cka_equal_tdhooks(example):
    points = example.token_points()
    assert set(points) == set(example.LAYERS) and all(p.shape == points["embeddings"].shape for p in points.values())
    ours = example.analyse(points)
    theirs = example.analyse(points, (their_dimensions.TwoNnDimensionEstimator, their_dimensions.LocalKnnDimensionEstimator, their_similarity.CkaEstimator))
    for key in ("twonn", "local_knn", "cka"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5)
    cka = ours["cka"]
    torch.testing.assert_close(cka, cka.T)
    torch.testing.assert_close(cka.diagonal(), torch.ones(len(example.LAYERS)))
    assert (ours["twonn"][1:] > 1).all()  # the encoder's token clouds are more than one-dimensional
