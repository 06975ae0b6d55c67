"""Figures from attributions (matplotlib, without pyplot)."""

import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure

from tdhook_fx.plotting import image_attribution, token_attribution


@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (8, 8, 3), (1, 8, 8)])
def test_image_attribution_accepts_the_usual_layouts(shape):
    figure = image_attribution(torch.randn(shape), torch.rand(shape))
    assert isinstance(figure, Figure)
    heat = figure.axes[0].images[-1].get_array()
    assert heat.shape == (8, 8)


@pytest.mark.parametrize("sign", ["all", "positive", "negative", "absolute"])
def test_image_attribution_signs(sign, tmp_path):
    attribution = torch.linspace(-1, 1, 64).reshape(8, 8)
    figure = image_attribution(attribution, sign=sign, colorbar=False)
    heat = figure.axes[0].images[-1].get_array()
    assert heat.min() >= (-1 if sign == "all" else 0)
    figure.savefig(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 0


def test_image_attribution_draws_into_given_axes():
    figure = Figure()
    axes = figure.subplots(1, 2)
    assert image_attribution(torch.randn(4, 4), ax=axes[1], title="IG") is figure
    assert axes[1].get_title() == "IG"


def test_image_attribution_errors():
    with pytest.raises(ValueError, match="sign must be one of"):
        image_attribution(torch.randn(4, 4), sign="up")
    with pytest.raises(ValueError, match=r"\(H, W\), \(C, H, W\) or \(H, W, C\)"):
        image_attribution(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="pixels but the attribution"):
        image_attribution(torch.randn(4, 4), torch.rand(5, 5))


def test_token_attribution_colours_each_token():
    tokens = ["the", "cat", "sat"]
    figure = token_attribution(tokens, torch.tensor([0.1, -2.0, 0.5]), title="why")
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == tokens
    colours = [t.get_bbox_patch().get_facecolor() for t in figure.axes[0].texts]
    assert colours[1][2] > colours[1][0]  # negative: blue
    assert token_attribution(tokens, torch.randn(3, 16)).axes  # an embedding attribution is summed


def test_token_attribution_needs_one_score_per_token():
    with pytest.raises(ValueError, match="one score per token"):
        token_attribution(["a", "b"], torch.ones(3))


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'tdhook_fx\[plot\]'"):
        image_attribution(torch.randn(4, 4))


def colour_bar_axes(figure):
    """The colour bar's axes (matplotlib makes one extra axes for it), and the limits it spans."""
    (bar,) = figure.axes[1:]
    return bar, bar.get_ylim()


def test_token_attribution_has_a_colour_scale_that_matches_the_boxes():
    from matplotlib import colormaps

    tokens, scores = ["the", "cat", "sat", "down"], torch.tensor([0.1, -2.0, 0.5, 1.5])
    figure = token_attribution(tokens, scores, label="IG")
    bar, limits = colour_bar_axes(figure)
    assert bar.get_ylabel() == "IG"
    assert limits == pytest.approx((-2.0, 2.0))  # centred on 0, as far as the largest |score|
    colour = colormaps["RdBu_r"]
    for text, score in zip(figure.axes[0].texts, scores.tolist()):
        assert tuple(text.get_bbox_patch().get_facecolor()) == pytest.approx(colour((score + 2.0) / 4.0))
    assert len(token_attribution(tokens, scores, colorbar=False).axes) == 1


def test_patching_heatmap_draws_the_values_with_labels_and_a_colour_bar(tmp_path):
    from tdhook_fx.plotting import patching_heatmap

    values = torch.tensor([[0.0, 1.0, -3.0], [2.0, 0.5, 0.25]])
    figure = patching_heatmap(values, ["blocks.0", "blocks.1"], ["The", " cat", " sat"], label="logit diff", title="patch")
    ax = figure.axes[0]
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), values)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocks.0", "blocks.1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["The", " cat", " sat"]
    assert ax.images[0].get_clim() == (-3.0, 3.0)
    bar, limits = colour_bar_axes(figure)
    assert bar.get_ylabel() == "logit diff" and limits == pytest.approx((-3.0, 3.0))
    assert ax.get_title() == "patch" and ax.get_xlabel() == "position" and ax.get_ylabel() == "site"
    figure.savefig(tmp_path / "patching.png")


def test_patching_heatmap_averages_extra_dimensions_and_labels_by_index():
    from tdhook_fx.plotting import patching_heatmap

    values = torch.randn(3, 4, 5)  # (layers, positions, batch)
    ax = patching_heatmap(values, ylabel="layer").axes[0]
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), values.mean(-1))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"] and ax.get_ylabel() == "layer"
    figure = Figure()
    own = figure.add_subplot()
    assert patching_heatmap(values, ax=own, colorbar=False) is figure and len(figure.axes) == 1


def test_patching_heatmap_errors():
    from tdhook_fx.plotting import patching_heatmap

    with pytest.raises(ValueError, match="2 site and 3 position labels for values of shape"):
        patching_heatmap(torch.zeros(3, 3), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"must be \(sites, positions, ...\)"):
        patching_heatmap(torch.zeros(3))
