"""Figures of attributions (a heatmap over an image, tokens coloured by their scores, each with a
colour bar) and of activation patching (a site x position heatmap, from any grid of values or
from a `tdhook_fx.sweep` result).

matplotlib is an optional dependency (`pip install "tdhook_fx[plot]"`). The functions return a
`matplotlib.figure.Figure` made without pyplot (no global state, any backend, headless):
`fig.savefig("attr.png")`, or `display(fig)` in a notebook. Pass `ax=` to draw into your own
axes instead (its figure is returned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdhook_fx.errors import InvalidArgument

_SIGNS = ("all", "positive", "negative", "absolute")


def image_attribution(
    attribution: torch.Tensor,
    image: torch.Tensor | None = None,
    *,
    ax=None,
    sign: str = "all",
    cmap: str | None = None,
    alpha: float = 0.6,
    title: str | None = None,
    colorbar: bool = True,
):
    """A heatmap of an image attribution, over the image if given.

    `attribution`: (H, W), or (C, H, W) / (H, W, C) summed over channels (the channel dim is
    the one of size 1, 3 or 4 when the layout is ambiguous). `image`: (H, W), (C, H, W) or
    (H, W, C), shown in grey or colour beneath (rescaled to [0, 1]). `sign`: "all" (a diverging
    map centred on 0), "positive", "negative" or "absolute".
    """
    if sign not in _SIGNS:
        raise InvalidArgument(f"sign must be one of {_SIGNS}, not {sign!r}")
    heat = _to_2d(attribution, "attribution")
    if sign == "positive":
        heat = heat.clamp(min=0)
    elif sign == "negative":
        heat = (-heat).clamp(min=0)
    elif sign == "absolute":
        heat = heat.abs()
    figure, ax = _axes(ax)
    if image is not None:
        picture = _to_image(image)
        if picture.shape[:2] != heat.shape:
            raise InvalidArgument(f"the image is {tuple(picture.shape[:2])} pixels but the attribution is {tuple(heat.shape)}")
        ax.imshow(picture.numpy(), cmap="gray" if picture.dim() == 2 else None)
    limit = float(heat.abs().max()) or 1.0
    if sign == "all":
        shown = ax.imshow(heat.numpy(), cmap=cmap or "bwr", vmin=-limit, vmax=limit, alpha=alpha if image is not None else 1.0)
    else:
        shown = ax.imshow(heat.numpy(), cmap=cmap or "inferno", vmin=0, vmax=limit, alpha=alpha if image is not None else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    if colorbar:
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return figure


def token_attribution(
    tokens: Sequence[str],
    scores: torch.Tensor,
    *,
    ax=None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    per_line: int = 12,
    colorbar: bool = True,
    label: str = "attribution",
):
    """Tokens written in boxes coloured by their scores (red positive, blue negative, centred on 0).

    `scores`: one per token (a (T, D) embedding attribution is summed over D first). A colour
    bar (labelled `label`) gives the scale: from -max|score| to +max|score|.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    values = torch.as_tensor(scores).detach().float().cpu()
    if values.dim() == 2:
        values = values.sum(-1)
    if values.dim() != 1 or len(values) != len(tokens):
        raise InvalidArgument(f"need one score per token: {len(tokens)} tokens, scores of shape {tuple(values.shape)}")
    limit = float(values.abs().max()) or 1.0
    colour = colormaps[cmap]
    norm = Normalize(-limit, limit)
    rows = max(1, -(-len(tokens) // per_line))
    width = min(len(tokens), per_line) * 0.9 + 0.6 + (1.2 if colorbar else 0)
    figure, ax = _axes(ax, size=(width, max(rows * 0.6 + (0.5 if title else 0.2), 1.6 if colorbar else 0)))
    ax.set_xlim(0, max(1, min(len(tokens), per_line)))
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for i, (token, value) in enumerate(zip(tokens, values.tolist())):
        row, column = divmod(i, per_line)
        ax.text(
            column + 0.5, row + 0.5, token, ha="center", va="center", fontsize=10,
            color="white" if abs(value) > 0.6 * limit else "black",
            bbox={"boxstyle": "round,pad=0.3", "facecolor": colour(norm(value)), "edgecolor": "none"},
        )
    if title:
        ax.set_title(title)
    if colorbar:
        figure.colorbar(ScalarMappable(norm=norm, cmap=colour), ax=ax, fraction=0.046, pad=0.04, label=label)
    return figure


def patching_heatmap(
    values: torch.Tensor,
    sites: Sequence[str] | None = None,
    positions: Sequence | None = None,
    *,
    ax=None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    colorbar: bool = True,
    label: str = "metric",
    xlabel: str = "position",
    ylabel: str = "site",
):
    """A heatmap of patching results: one row per site (or layer), one column per position.

    `values`: (sites, positions), e.g. the logit difference recovered by patching each layer at
    each position (extra trailing dimensions, such as a batch, are averaged). `sites` and
    `positions` label the rows and columns (default: their indices; positions may be the
    prompt's tokens). Colours are centred on 0 (red positive); the colour bar says `label`.
    """
    grid = _mean_over_rest(torch.as_tensor(values).detach().float().cpu(), 2)
    if grid.dim() != 2:
        raise InvalidArgument(f"patching values must be (sites, positions, ...); got shape {tuple(grid.shape)}")
    sites = [str(s) for s in (range(grid.shape[0]) if sites is None else sites)]
    positions = [str(p) for p in (range(grid.shape[1]) if positions is None else positions)]
    if (len(sites), len(positions)) != tuple(grid.shape):
        raise InvalidArgument(
            f"{len(sites)} site and {len(positions)} position labels for values of shape {tuple(grid.shape)}: "
            "give one label per row and per column"
        )
    size = (min(12, max(4.0, 2.5 + 0.45 * len(positions))), min(10, max(2.5, 1.2 + 0.35 * len(sites))))
    figure, ax = _axes(ax, size=size)
    limit = float(grid.abs().max()) or 1.0
    shown = ax.imshow(grid.numpy(), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set_xticks(range(len(positions)), positions, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if colorbar:
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)
    return figure


def sweep_heatmap(
    result,
    key="metric",
    *,
    ax=None,
    cmap: str = "RdBu_r",
    title: str | None = None,
    colorbar: bool = True,
    chunk: int = 4096,
):
    """A heatmap of a patching sweep: one row per swept site (layer), one column per position.

    `result` is what `tdhook_fx.sweep` returned: in memory (batch size [sites, positions], each
    entry's value averaged over its remaining dimensions, e.g. the batch), or streamed to disk
    (batch size [prompts]: averaged over the prompts too, `chunk` rows at a time, so a large
    memory-mapped result is never read whole). Colours are centred on 0 (red positive).
    """
    values = result.get(key)
    if result.batch_dims == 2:
        grid = _mean_over_rest(values.detach().float(), 2)
        sites = list(result["site"])
        positions = result["position"][0].tolist()
    elif result.batch_dims == 1:
        total = None
        for start in range(0, result.batch_size[0], chunk):
            part = _mean_over_rest(values[start : start + chunk].detach().float(), 3).sum(0)
            total = part if total is None else total + part
        if total is None:
            raise InvalidArgument("the sweep result holds no prompts")
        grid = total / result.batch_size[0]
        sites, positions = list(result["site"]), list(result["position"])
    else:
        raise InvalidArgument(
            f"a sweep result has batch size [sites, positions] or, streamed to disk, [prompts]; got {list(result.batch_size)}"
        )
    if tuple(grid.shape) != (len(sites), len(positions)):
        raise InvalidArgument(f"{key!r} does not have one value per site and position: {tuple(grid.shape)}")
    return patching_heatmap(grid, sites, positions, ax=ax, cmap=cmap, title=title, colorbar=colorbar, label=str(key))


def _mean_over_rest(values: torch.Tensor, keep: int) -> torch.Tensor:
    """The mean over every dimension after the first `keep`."""
    return values.reshape(*values.shape[:keep], -1).mean(-1) if values.dim() > keep else values


def _axes(ax, size=(5, 4)):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError(
            "tdhook_fx.plotting needs matplotlib\n  hint: pip install 'tdhook_fx[plot]' (or pip install matplotlib)"
        ) from error
    if ax is not None:
        return ax.figure, ax
    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.add_subplot()


def _to_2d(attribution: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(attribution).detach().float().cpu()
    if x.dim() == 3:
        x = x.sum(_channel_dim(x))
    if x.dim() != 2:
        raise InvalidArgument(f"the {what} must be (H, W), (C, H, W) or (H, W, C); got shape {tuple(x.shape)}")
    return x


def _to_image(image: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(image).detach().float().cpu()
    if x.dim() == 3:
        x = x.movedim(_channel_dim(x), -1)
        if x.shape[-1] == 1:
            x = x[..., 0]
    if x.dim() not in (2, 3):
        raise InvalidArgument(f"the image must be (H, W), (C, H, W) or (H, W, C); got shape {tuple(x.shape)}")
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def _channel_dim(x: torch.Tensor) -> int:
    """0 for (C, H, W), 2 for (H, W, C): the first dim of size 1, 3 or 4, else the smallest."""
    if x.shape[0] in (1, 3, 4):
        return 0
    if x.shape[-1] in (1, 3, 4):
        return 2
    return 0 if x.shape[0] <= x.shape[-1] else 2


__all__ = ["image_attribution", "patching_heatmap", "sweep_heatmap", "token_attribution"]
