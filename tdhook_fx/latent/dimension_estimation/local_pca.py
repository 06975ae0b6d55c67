"""Local dimension by PCA of each point's neighbourhood (Fukunaga & Olsen 1971).

The neighbourhood is the point and its k nearest neighbours; its dimension is read from the
principal variances: where the largest ratio between consecutive ones lies ("maxgap", Bruske &
Sommer 1998), or how many exceed `alpha` times the largest ("ratio").
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict.utils import NestedKey

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.latent.dimension_estimation.estimator import PointwiseEstimator
from tdhook_fx.latent.dimension_estimation.neighbours import check_k, neighbour_count, ranked_neighbours
from tdhook_fx.latent.dimension_estimation.spectra import explained_variances, nearest

CRITERIA = ("maxgap", "ratio")


class LocalPcaDimensionEstimator(PointwiseEstimator):
    """One dimension per point from the PCA of it and its k nearest neighbours (NaN where it has
    fewer than k); `k="auto"` takes about sqrt(N). Needs N >= k + 1."""

    def __init__(
        self,
        k: int | Literal["auto"] = "auto",
        criterion: Literal["maxgap", "ratio"] = "maxgap",
        alpha: float = 0.05,
        in_key: NestedKey = "data",
        out_key: NestedKey = "dimension",
        eps: float = 1e-5,
    ):
        check_k(k, 1)
        if criterion not in CRITERIA:
            raise InvalidArgument(f"Unknown criterion: {criterion!r}; use one of {CRITERIA}")
        super().__init__(in_key, out_key, eps)
        self.k = k
        self.criterion = criterion
        self.alpha = alpha

    def check_points(self, count: int) -> None:
        k = neighbour_count(self.k, count)
        if count < k + 1:
            raise InvalidArgument(f"At least k+1 points required for local PCA (k={k}), got {count}")

    def per_point(self, points: torch.Tensor) -> torch.Tensor:
        k = neighbour_count(self.k, len(points))
        distances, order = ranked_neighbours(points, self.eps)
        found = []
        for i in range(len(points)):
            neighbours = nearest(distances[i], order[i], k)
            if neighbours is None:
                found.append(float("nan"))
                continue
            variances = explained_variances(torch.cat([points[i : i + 1], points[neighbours]]))
            found.append(float(self._dimension(variances)))
        return torch.tensor(found, dtype=torch.float32, device=points.device)

    def _dimension(self, variances: torch.Tensor) -> int:
        if self.criterion == "ratio":
            return max(1, int((variances > self.alpha * variances[0]).sum()))
        if len(variances) < 2:
            return 1
        return int(torch.argmax(variances[:-1] / (variances[1:] + 1e-15))) + 1

    def finish(self, dimensions: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return dimensions.to(device=data.device, dtype=data.dtype)

    def _fields(self) -> str:
        return f"k={self.k},\ncriterion={self.criterion!r},\nalpha={self.alpha},\neps={self.eps}"
