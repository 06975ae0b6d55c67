"""Information imbalance (Glielmo et al. 2022) between two representations of the same points.

Delta(A -> B) = 2/N * mean over points i of the rank, in B's distances from i, of i's nearest
neighbour in A: near 0 where A's neighbourhoods predict B's, near 1 where they say nothing
about them. Both directions are written; A -> B small and B -> A large means A holds B's
information and more.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdhook_fx.latent.representation_similarity.pairs import common_float, paired_datasets


class InformationImbalanceEstimator(TensorDictModuleBase):
    """Reads `in_key_a` and `in_key_b` ((..., N, D) each, N >= 2), writes both directions' imbalance
    (...) at `out_key_a_to_b` and `out_key_b_to_a`; distances are Minkowski-`p`."""

    def __init__(
        self,
        in_key_a: NestedKey = "data_a",
        in_key_b: NestedKey = "data_b",
        out_key_a_to_b: NestedKey = "information_imbalance_a_to_b",
        out_key_b_to_a: NestedKey = "information_imbalance_b_to_a",
        p: float = 2.0,
    ):
        super().__init__()
        self.in_key_a = in_key_a
        self.in_key_b = in_key_b
        self.out_key_a_to_b = out_key_a_to_b
        self.out_key_b_to_a = out_key_b_to_a
        self.p = p
        self.in_keys = [in_key_a, in_key_b]
        self.out_keys = [out_key_a_to_b, out_key_b_to_a]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        a, b = td[self.in_key_a], td[self.in_key_b]
        flat_a, flat_b = paired_datasets(a, b, "Information Imbalance", least=2)
        forward, backward = [], []
        for x, y in zip(flat_a, flat_b):
            dtype = common_float(x, y)
            ranks_x, ranks_y = distance_ranks(x.to(dtype), self.p), distance_ranks(y.to(dtype), self.p)
            forward.append(imbalance(ranks_x, ranks_y))
            backward.append(imbalance(ranks_y, ranks_x))
        for key, values in ((self.out_key_a_to_b, forward), (self.out_key_b_to_a, backward)):
            td[key] = (torch.stack(values) if values else torch.empty(0, device=a.device)).reshape(a.shape[:-2])
        return td

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n    in_keys={self.in_keys},\n    out_keys={self.out_keys},\n    p={self.p})"


def distance_ranks(points: torch.Tensor, p: float) -> torch.Tensor:
    """(N, N): in row i, each point's rank by distance from point i (i itself 0, the nearest 1)."""
    distances = torch.cdist(points, points, p=p)
    distances.fill_diagonal_(float("-inf"))
    return torch.argsort(torch.argsort(distances, dim=1), dim=1)


def imbalance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Delta(source -> target) from the two rank matrices, as float32."""
    nearest = source == 1
    return 2.0 / len(source) * target[nearest].float().mean()
