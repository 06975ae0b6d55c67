"""A layer LRP composites know: `Sum`, a module form of `torch.sum` (its rule: the normalized epsilon)."""

from __future__ import annotations

import torch
from torch import nn


class Sum(nn.Module):
    """`torch.sum(input, dim=dim)` as a module, so that a rule can name it."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.sum(input, dim=self.dim)
