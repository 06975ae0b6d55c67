"""Linear centred kernel alignment (Kornblith et al. 2019) between two representations.

With X and Y centred over the N points, CKA = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F): 1 for
representations equal up to rotation and isotropic scale, 0 for unrelated ones. The same value
comes from the N x N Gram matrices, tr(K L) / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T, which
is cheaper when there are fewer points than features.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdhook_fx.latent.representation_similarity.pairs import common_float, paired_datasets


class CkaEstimator(TensorDictModuleBase):
    """Reads `in_key_a` (..., N, Da) and `in_key_b` (..., N, Db), writes `out_key` (...): the linear
    CKA of each pair of datasets (NaN where a representation is constant: its norm <= `eps`)."""

    def __init__(self, in_key_a: NestedKey = "data_a", in_key_b: NestedKey = "data_b", out_key: NestedKey = "cka", kernel: str = "linear", eps: float = 1e-12):
        super().__init__()
        if kernel != "linear":
            raise NotImplementedError(f"Unsupported kernel '{kernel}'. Only 'linear' is implemented for now.")
        self.in_key_a = in_key_a
        self.in_key_b = in_key_b
        self.out_key = out_key
        self.kernel = kernel
        self.eps = eps
        self.in_keys = [in_key_a, in_key_b]
        self.out_keys = [out_key]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        a, b = td[self.in_key_a], td[self.in_key_b]
        flat_a, flat_b = paired_datasets(a, b, "CKA")
        values = [linear_cka(x, y, self.eps) for x, y in zip(flat_a, flat_b)]
        td[self.out_key] = (torch.stack(values) if values else torch.empty(0, device=a.device)).reshape(a.shape[:-2])
        return td

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(\n    in_keys={self.in_keys},\n    out_keys={self.out_keys},\n"
            f"    kernel='{self.kernel}',\n    eps={self.eps})"
        )


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Linear CKA of `x` (N, Dx) and `y` (N, Dy) as a float32 scalar (NaN where undefined)."""
    dtype = common_float(x, y)
    x = x.to(dtype) - x.to(dtype).mean(dim=0)
    y = y.to(dtype) - y.to(dtype).mean(dim=0)
    if len(x) < max(x.shape[1], y.shape[1]):  # through the Gram matrices: N x N
        gram_x, gram_y = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (gram_x * gram_y).sum(), gram_x.square().sum(), gram_y.square().sum()
    else:
        cross = (x.T @ y).square().sum()
        norm_x, norm_y = (x.T @ x).square().sum(), (y.T @ y).square().sum()
    denominator = torch.sqrt(norm_x * norm_y)
    if not bool(torch.isfinite(denominator)) or denominator <= eps:
        return torch.tensor(float("nan"), device=x.device)
    return (cross / denominator).float()
