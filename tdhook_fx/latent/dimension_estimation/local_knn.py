"""Local dimension from k-NN distances (Farahmand et al. 2007): d(x) = ln 2 / ln(R_2k / R_k).

In d dimensions the number of neighbours within radius r grows like r^d, so doubling the
neighbours (k -> 2k) multiplies the radius by 2^(1/d).
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict.utils import NestedKey

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.latent.dimension_estimation.estimator import PointwiseEstimator
from tdhook_fx.latent.dimension_estimation.neighbours import check_k, neighbour_count, ranked_neighbours


class LocalKnnDimensionEstimator(PointwiseEstimator):
    """One dimension per point from its k-th and 2k-th neighbour distances (NaN where either is
    missing or they are equal); `k="auto"` takes about sqrt(N). Needs N >= 2k + 1."""

    def __init__(self, k: int | Literal["auto"] = "auto", in_key: NestedKey = "data", out_key: NestedKey = "dimension", eps: float = 1e-5):
        check_k(k, 2)
        super().__init__(in_key, out_key, eps)
        self.k = k

    def check_points(self, count: int) -> None:
        k = neighbour_count(self.k, count)
        if count < 2 * k + 1:
            raise InvalidArgument(f"At least 2k+1 points required for local KNN (k={k}), got {count}")

    def per_point(self, points: torch.Tensor) -> torch.Tensor:
        k = neighbour_count(self.k, len(points))
        distances, _ = ranked_neighbours(points, self.eps)
        near, far = distances[:, k - 1], distances[:, 2 * k - 1]
        usable = torch.isfinite(near) & torch.isfinite(far) & (far > near)
        dimension = torch.tensor(2.0, dtype=points.dtype, device=points.device).log() / torch.log(far / near)
        return torch.where(usable, dimension, torch.nan).float()

    def _fields(self) -> str:
        return f"k={self.k},\neps={self.eps}"
