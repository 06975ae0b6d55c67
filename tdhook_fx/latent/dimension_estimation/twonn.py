"""TwoNN (Facco et al. 2017): the dimension from the ratio of each point's two nearest distances.

For points drawn from a d-dimensional manifold, mu = r2 / r1 follows a Pareto law with
exponent d, so -log(1 - F(mu)) = d log(mu), F being the empirical distribution of mu. The
dimension is the slope of that line through the origin, fitted by least squares on all points
but the largest mu (where F = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.latent.dimension_estimation.neighbours import datasets, ranked_neighbours


def _suffixed(key: NestedKey, suffix: str) -> NestedKey:
    return f"{key}{suffix}" if isinstance(key, str) else (*key[:-1], f"{key[-1]}{suffix}")


class TwoNnDimensionEstimator(TensorDictModuleBase):
    """One dimension per dataset: reads `in_key` (N, D) or (..., N, D), writes `out_key` (...).

    `return_xy=True` also writes the fitted points, log(mu) at `<out_key>_x` and -log(1 - F) at
    `<out_key>_y`, each (..., N - 1) (NaN-padded where duplicates left fewer points).
    Points closer than `eps` are duplicates, not neighbours.
    """

    def __init__(self, in_key: NestedKey = "data", out_key: NestedKey = "dimension", return_xy: bool = False, eps: float = 1e-5):
        super().__init__()
        self.in_key = in_key
        self.out_key = out_key
        self.return_xy = return_xy
        self.eps = eps
        self._x_key = _suffixed(out_key, "_x")
        self._y_key = _suffixed(out_key, "_y")
        self.in_keys = [in_key]
        self.out_keys = [out_key, self._x_key, self._y_key] if return_xy else [out_key]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        data = td[self.in_key]
        if data.ndim >= 2 and data.shape[-2] < 3:
            raise InvalidArgument("At least 3 points required for Two NN dimension estimation")
        fits = [two_nn(points, self.eps) for points in datasets(data, type(self).__name__)]
        batch, width = data.shape[:-2], data.shape[-2] - 1
        td[self.out_key] = torch.stack([d for d, _, _ in fits]).reshape(batch)
        if self.return_xy:
            td[self._x_key] = torch.stack([F.pad(x, (0, width - len(x)), value=float("nan")) for _, x, _ in fits]).reshape(*batch, width)
            td[self._y_key] = torch.stack([F.pad(y, (0, width - len(y)), value=float("nan")) for _, _, y in fits]).reshape(*batch, width)
        return td

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n    in_keys={self.in_keys},\n    out_keys={self.out_keys},\n    eps={self.eps})"


def two_nn(points: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dimension as float32, x = log mu, y = -log(1 - F)) for `points` (N, D)."""
    distances, _ = ranked_neighbours(points, eps)
    first, second = distances[:, 0], distances[:, 1]
    kept = torch.isfinite(first) & torch.isfinite(second)
    n = int(kept.sum())
    if n < 3:
        raise InvalidArgument(
            f"At least 3 valid points required for Two NN dimension estimation; {n} have two neighbours "
            f"farther than eps={eps}"
        )
    mu = torch.sort((second / first)[kept]).values
    x = torch.log(mu[:-1])
    y = -torch.log(1 - torch.arange(1, n, dtype=points.dtype, device=points.device) / n)
    slope = (x.double() * y.double()).sum() / x.double().square().sum()  # least squares through the origin
    return slope.float(), x, y
