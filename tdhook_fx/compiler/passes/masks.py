"""Pruning masks, computed the way `torch.nn.utils.prune` computes them (same rounding, same ties).

`amount` is a count of weights (int) or a fraction (float in [0, 1]); with `dim`, whole slices
along `dim` are pruned (by their L2 norm, or at random), as `ln_structured` does.
"""

from __future__ import annotations

import torch


def to_prune(amount: int | float, size: int) -> int:
    """How many of `size` entries to prune (a fraction is rounded half to even, as torch does)."""
    return amount if isinstance(amount, int) else round(amount * size)


def magnitude_mask(weight: torch.Tensor, amount: int | float, dim: int | None = None) -> torch.Tensor:
    """Zero the `amount` entries with the smallest |weight| (or slices with the smallest L2 norm)."""
    if dim is None:
        mask = torch.ones_like(weight)
        k = to_prune(amount, weight.numel())
        if k:
            mask.view(-1)[torch.topk(weight.abs().reshape(-1), k=k, largest=False).indices] = 0
        return mask
    dim = dim % weight.dim()
    k = to_prune(amount, weight.shape[dim])
    if not k:
        return torch.ones_like(weight)
    others = [d for d in range(weight.dim()) if d != dim]
    norms = torch.norm(weight, p=2, dim=others)
    keep = torch.topk(norms, k=weight.shape[dim] - k, largest=True).indices
    return _slices(weight, dim, keep)


def random_mask(weight: torch.Tensor, amount: int | float, dim: int | None, seed: int | None) -> torch.Tensor:
    """Zero `amount` entries (or slices along `dim`) chosen at random; `seed` makes it repeatable."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if dim is None:
            mask = torch.ones_like(weight)
            k = to_prune(amount, weight.numel())
            if k:
                scores = torch.rand_like(weight)
                mask.view(-1)[torch.topk(scores.view(-1), k=k).indices] = 0
            return mask
        dim = dim % weight.dim()
        k = to_prune(amount, weight.shape[dim])
        if not k:
            return torch.ones_like(weight)
        scores = torch.rand(weight.shape[dim])
        threshold = torch.kthvalue(scores, k=k).values
        return _slices(weight, dim, torch.nonzero(scores > threshold).flatten())


def _slices(weight: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(weight)
    index = [slice(None)] * weight.dim()
    index[dim] = keep
    mask[tuple(index)] = 1
    return mask
