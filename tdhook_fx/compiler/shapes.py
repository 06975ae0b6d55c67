"""Shape facts shared by resolution (compile time), the graph's ops (call time) and the test strategies."""

from __future__ import annotations

import torch


def broadcasts_to(shape, target) -> bool:
    """Whether `shape` broadcasts to exactly `target` by torch's rules.

    Plain integer sizes are compared directly: `torch.broadcast_shapes` costs tens of
    microseconds per call, a visible share of a small model's forward. Symbolic sizes (while
    torch.compile or torch.export traces) go through `torch.broadcast_shapes`.
    """
    if len(shape) > len(target):
        return False
    if all(type(size) is int for size in (*shape, *target)):
        return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def indexed_shape(shape, index: tuple) -> torch.Size:
    """The shape of `value[index]` for a value of `shape` (worked out on a meta tensor: no data)."""
    return torch.empty(shape, device="meta")[index].shape
