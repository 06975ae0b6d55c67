"""Local PCA spectra: the variances of a point's neighbourhood along its principal axes."""

from __future__ import annotations

import torch


def explained_variances(neighbourhood: torch.Tensor) -> torch.Tensor:
    """The principal variances of `neighbourhood` (n, D), largest first, min(n, D) of them, in
    float64 (as scikit-learn's `PCA().explained_variance_`: squared singular values of the
    centred points over n - 1)."""
    points = neighbourhood.detach().double()
    centred = points - points.mean(dim=0)
    return torch.linalg.svdvals(centred).square() / (len(points) - 1)


def nearest(distances: torch.Tensor, order: torch.Tensor, count: int) -> torch.Tensor | None:
    """The first `count` neighbours of one row (ranked distances and indices), or None where
    fewer than `count` are neighbours at all."""
    found = order[torch.isfinite(distances)][:count]
    return found if len(found) == count else None
