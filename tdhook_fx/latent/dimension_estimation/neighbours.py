"""What every intrinsic-dimension estimator starts from: each point's neighbours, nearest first."""

from __future__ import annotations

from typing import Literal

import torch

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType


def ranked_neighbours(points: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For `points` (N, D): each row's distances to the other points in ascending order, and
    the points they belong to, both (N, N).

    A point is not its own neighbour, and a point closer than `eps` counts as a duplicate, not
    a neighbour: both get distance inf and so come last in their row.
    """
    distances = torch.cdist(points, points)
    not_neighbour = (distances <= eps) | torch.eye(len(points), dtype=torch.bool, device=points.device)
    return torch.sort(distances.masked_fill(not_neighbour, float("inf")), dim=1)


def neighbour_count(k: int | Literal["auto"], points: int) -> int:
    """`k` itself, or for "auto" about the square root of the number of points (at least 2, at
    most half of the other points)."""
    return max(2, min(int(points**0.5), (points - 1) // 2)) if k == "auto" else k


def check_k(k, smallest: int) -> None:
    """Refuse a `k` that is neither "auto" nor an integer of at least `smallest`."""
    if k == "auto":
        return
    if not isinstance(k, int):
        raise InvalidArgumentType("k must be an int or 'auto'")
    if k < smallest:
        raise InvalidArgument("k must be at least 1" if smallest == 1 else f"k must be greater than {smallest - 1}")


def datasets(data: torch.Tensor, what: str) -> torch.Tensor:
    """`data` (N, D) or (..., N, D) as a stack of datasets (M, N, D)."""
    if data.ndim < 2:
        raise InvalidArgument(f"{what} expects data of shape (N, D) or (..., N, D); got {tuple(data.shape)}")
    return data.reshape(-1, *data.shape[-2:])
