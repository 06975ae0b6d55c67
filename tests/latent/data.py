"""Fixed point clouds for the estimator tests: known dimensions, duplicates, several datasets."""

from __future__ import annotations

import torch


def curved(datasets: int = 2, points: int = 90, dimension: int = 3, seed: int = 0) -> torch.Tensor:
    """`datasets` clouds of points on a curved `dimension`-dimensional manifold in 3 * dimension + 1 dims."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(datasets, points, dimension, generator=generator) * 2 - 1
    return torch.cat([z, torch.sin(2 * z), z.square(), z.sum(-1, keepdim=True) ** 3], dim=-1)


def flat(points: int = 120, dimension: int = 2, ambient: int = 6, seed: int = 1) -> torch.Tensor:
    """Points on a random `dimension`-dimensional plane through the origin of R^ambient."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(ambient, dimension, generator=generator)).Q
    return torch.rand(points, dimension, generator=generator) @ basis.T


def with_duplicates(data: torch.Tensor) -> torch.Tensor:
    """`data` with a few points repeated (distance 0: not neighbours for the estimators)."""
    data = data.clone()
    data[..., 5, :] = data[..., 6, :]
    data[..., 20, :] = data[..., 21, :] + 1e-7
    return data
