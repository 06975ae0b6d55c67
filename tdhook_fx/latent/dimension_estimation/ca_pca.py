"""Curvature-adjusted local PCA (Gilbert & O'Neill 2023).

Local PCA compares a neighbourhood's principal variances with those of a flat d-dimensional
ball; CA-PCA compares them with those of a quadratic (curved) d-dimensional patch, which moves
variance from the first d axes to the rest. With the variances scaled by the squared
neighbourhood radius r (lambda), the chosen d minimises

    || 1/(d+2) (first d) - (lambda_1..d + (3d+4)/(d(d+4)) * sum(lambda_d+1..D)) || + 2 * sum(lambda_d+1..D)
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict.utils import NestedKey

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.latent.dimension_estimation.estimator import PointwiseEstimator
from tdhook_fx.latent.dimension_estimation.neighbours import check_k, neighbour_count, ranked_neighbours
from tdhook_fx.latent.dimension_estimation.spectra import explained_variances, nearest


class CaPcaDimensionEstimator(PointwiseEstimator):
    """One dimension per point from its k + 1 nearest neighbours, the radius r halfway between
    the k-th and (k+1)-th neighbour distance (NaN where they are missing); `k="auto"` takes
    about sqrt(N). Needs N >= k + 2."""

    def __init__(self, k: int | Literal["auto"] = "auto", in_key: NestedKey = "data", out_key: NestedKey = "dimension", eps: float = 1e-5):
        check_k(k, 1)
        super().__init__(in_key, out_key, eps)
        self.k = k

    def check_points(self, count: int) -> None:
        k = neighbour_count(self.k, count)
        if count < k + 2:
            raise InvalidArgument(f"At least k+2 points required for CA-PCA (k={k}), got {count}")

    def per_point(self, points: torch.Tensor) -> torch.Tensor:
        k = neighbour_count(self.k, len(points))
        distances, order = ranked_neighbours(points, self.eps)
        found = []
        for i in range(len(points)):
            radius = float((distances[i, k - 1] + distances[i, k]) / 2)
            neighbours = nearest(distances[i], order[i], k + 1)
            if neighbours is None or not 0 < radius < float("inf"):
                found.append(float("nan"))
                continue
            scaled = torch.zeros(points.shape[1], dtype=torch.float64)
            variances = explained_variances(points[neighbours]).cpu()
            scaled[: len(variances)] = variances / radius**2
            found.append(float(curved_dimension(scaled)))
        return torch.tensor(found, dtype=torch.float32, device=points.device)

    def finish(self, dimensions: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return dimensions.to(device=data.device, dtype=data.dtype)

    def _fields(self) -> str:
        return f"k={self.k},\neps={self.eps}"


def curved_dimension(scaled: torch.Tensor) -> int:
    """The d in 1..D whose curved-patch spectrum fits `scaled` (D variances / r^2) best (the
    smallest such d on a tie)."""
    size = len(scaled)
    d = torch.arange(1, size + 1, dtype=torch.float64)
    tails = torch.stack([scaled[j:].sum() for j in range(1, size + 1)])  # the variance beyond the first d axes
    head = torch.arange(size)[None, :] < d[:, None]  # (candidate d, axis): the axis is among the first d
    adjusted = torch.where(head, scaled[None, :] + ((3 * d + 4) / (d * (d + 4)) * tails)[:, None], 0.0)
    expected = torch.where(head, 1 / (d + 2)[:, None], 0.0)
    scores = torch.linalg.vector_norm(expected - adjusted, dim=1) + 2 * tails
    return int(torch.argmin(scores)) + 1
