"""Functions that rewritten graphs call (each appears as one readable node in `.code`).

They are plain, traceable torch code: torch.compile and torch.export trace through them.
"""

from __future__ import annotations

import torch

from tdhook_fx.errors import BindingError
from tdhook_fx.passes.masks import magnitude_mask


def fit(value: torch.Tensor, like: torch.Tensor, statement: str, site: str) -> torch.Tensor:
    """`value` checked to broadcast to `like` (the site's value) and cast to its dtype."""
    if value.shape != like.shape and value.dim() > 0:
        try:
            fits = torch.broadcast_shapes(value.shape, like.shape) == like.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise BindingError(
                f"{statement}: a runtime value of shape {tuple(value.shape)} does not fit "
                f"{site}, of shape {tuple(like.shape)} in this call\n"
                "  hint: the value must broadcast to the site by torch's rules; for a per-example "
                "vector at a (batch, seq, dim) site use shape (batch, 1, dim)"
            )
    return value.to(like.dtype)


def call(function, *args) -> torch.Tensor:
    """Call a Python function bound as a runtime value (`$f(...)` in a program)."""
    result = function(*args)
    if not isinstance(result, torch.Tensor):
        name = getattr(function, "__name__", type(function).__name__)
        raise BindingError(f"the function {name} bound in the program returned a {type(result).__name__}, not a tensor")
    return result


def filled(like: torch.Tensor, value) -> torch.Tensor:
    """A new tensor shaped like `like`, every element set from `value` (broadcast)."""
    return torch.empty_like(like).copy_(value)


def assign(x: torch.Tensor, index: tuple, value) -> torch.Tensor:
    """`x` with `x[index] = value`, without changing `x`."""
    out = x.clone()
    out[index] = value
    return out


def steer_at(x: torch.Tensor, index: tuple, op: str, value) -> torch.Tensor:
    """`x` with `x[index] += value` (or -=, *=), without changing `x`."""
    out = x.clone()
    region = out[index]
    out[index] = region + value if op == "+=" else region - value if op == "-=" else region * value
    return out


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over the batch (dimension 0), kept as a dimension of size 1."""
    return x.mean(0, keepdim=True)


def importance_mask(scores: torch.Tensor, weight: torch.Tensor, amount: int | float, dim: int | None) -> torch.Tensor:
    """A pruning mask for `weight` that zeroes the entries (or slices) with the lowest |scores|."""
    if scores.shape != weight.shape:
        raise BindingError(
            f"importance scores of shape {tuple(scores.shape)} do not match the pruned weight "
            f"of shape {tuple(weight.shape)}"
        )
    return magnitude_mask(scores.detach(), amount, dim).to(weight.dtype)
