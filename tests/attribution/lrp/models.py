"""Models for the LRP tests: an MLP, a CNN with batch norm and pooling, a small transformer block
whose every relevance-carrying operation is a module (so that a rule can name it).

Shared with the reference script (tests/attribution/lrp/references.py), which rebuilds them
in zennit's and LXT's environment: keep this file free of tdhook_fx imports.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(30)
    return nn.Sequential(
        nn.Linear(6, 16, bias=bias), nn.ReLU(), nn.Linear(16, 12, bias=bias), nn.ReLU(), nn.Linear(12, 4, bias=bias)
    ).eval()


def cnn(bias: bool = True) -> nn.Module:
    """Conv, batch norm (with non-trivial statistics), ReLU, max- and average pooling, linear."""
    torch.manual_seed(31)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 4, bias=bias),
    ).eval()
    with torch.no_grad():
        norm = model[1]
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3) if bias else norm.bias.zero_()
    return model


class MatMul(nn.Module):
    """a @ b * scale (the scale inside, so that relevance rules see one product)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, a, b):
        return torch.matmul(a, b) * self.scale if self.scale != 1.0 else torch.matmul(a, b)


class Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP) on (batch, tokens, width), then a linear head
    on the last token."""

    def __init__(self, width: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.scores = MatMul(scale=(width // heads) ** -0.5)
        self.softmax = nn.Softmax(dim=-1)
        self.mix = MatMul()
        self.proj = nn.Linear(width, width)
        self.add1 = Add()
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * width, width)
        self.add2 = Add()
        self.head = nn.Linear(width, classes)

    def split(self, t):
        batch, tokens, width = t.shape
        return t.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        attention = self.softmax(self.scores(self.split(q), self.split(k).transpose(-1, -2)))
        mixed = self.mix(attention, self.split(v)).transpose(1, 2).reshape(batch, tokens, width)
        h = self.add1(x, self.proj(mixed))
        h = self.add2(h, self.fc2(self.act(self.fc1(self.ln2(h)))))
        return self.head(h[:, -1])


def block() -> nn.Module:
    torch.manual_seed(32)
    model = Block().eval()
    with torch.no_grad():
        for norm in (model.ln1, model.ln2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.2)
    return model


def inputs(name: str, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(33)
    shape = {"mlp": (batch, 6), "cnn": (batch, 3, 8, 8), "block": (batch, 5, 8)}[name]
    return torch.randn(shape, generator=generator)


MODELS = {"mlp": mlp, "cnn": cnn, "block": block}
TARGET_CLASS = 1
