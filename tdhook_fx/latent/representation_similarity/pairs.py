"""Two representations of the same points, read from a TensorDict and checked together."""

from __future__ import annotations

import torch

from tdhook_fx.errors import InvalidArgument


def paired_datasets(a: torch.Tensor, b: torch.Tensor, what: str, least: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`a` (..., N, Da) and `b` (..., N, Db) as stacks of datasets (M, N, Da) and (M, N, Db)."""
    if a.ndim < 2 or b.ndim < 2:
        raise InvalidArgument(f"{what} expects tensors with shape (N, D) or (..., N, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise InvalidArgument(f"Expected matching batch shapes, got {a.shape[:-2]} and {b.shape[:-2]}")
    if a.shape[-2] != b.shape[-2]:
        raise InvalidArgument(f"Expected matching sample counts, got {a.shape[-2]} and {b.shape[-2]}")
    if a.device != b.device:
        raise InvalidArgument(f"Expected both tensors on the same device, got {a.device} and {b.device}")
    if a.shape[-2] < least:
        raise InvalidArgument(f"Expected at least {least} samples, got {a.shape[-2]}")
    return a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])


def common_float(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype both are compared in: their promoted dtype, float32 for integers."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return dtype if dtype.is_floating_point else torch.float32
