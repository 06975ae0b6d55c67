"""The TensorDict surface the intrinsic-dimension estimators share (tdhook's keys and layout)."""

from __future__ import annotations

from abc import abstractmethod

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdhook_fx.latent.dimension_estimation.neighbours import datasets


class PointwiseEstimator(TensorDictModuleBase):
    """An estimator of one dimension per point: reads `in_key` (N, D) or (..., N, D), writes
    `out_key` (..., N). Each dataset of N points is estimated on its own."""

    def __init__(self, in_key: NestedKey, out_key: NestedKey, eps: float):
        super().__init__()
        self.in_key = in_key
        self.out_key = out_key
        self.eps = eps
        self.in_keys = [in_key]
        self.out_keys = [out_key]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        data = td[self.in_key]
        flat = datasets(data, type(self).__name__)
        self.check_points(data.shape[-2])
        found = [self.per_point(points) for points in flat]
        td[self.out_key] = self.finish(torch.stack(found).reshape(*data.shape[:-1]), data)
        return td

    @abstractmethod
    def check_points(self, count: int) -> None:
        """Refuse datasets of `count` points too small for this estimator's k."""

    @abstractmethod
    def per_point(self, points: torch.Tensor) -> torch.Tensor:
        """The dimension at each of `points` (N, D), as float32 (N,)."""

    def finish(self, dimensions: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """The estimates as written (the PCA estimators take the data's dtype and device)."""
        return dimensions

    def _fields(self) -> str:
        return f"eps={self.eps}"

    def __repr__(self) -> str:
        fields = f"in_keys={self.in_keys},\nout_keys={self.out_keys},\n" + self._fields()
        return f"{type(self).__name__}(\n" + "\n".join("    " + line for line in fields.splitlines()) + ")"
