"""Fixtures of the method-layer tests: the models tdhook and tdhook_fx are compared on.

The models are built once per test process, so their graph captures (cached per model
object by the compiler) are shared by every test.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx import zoo


@pytest.fixture(scope="session")
def mlp():
    """tdhook's own example model, `Sequential(Linear(3,5), ReLU(), Linear(5,2))`, and a batch of 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    return zoo.Sample(model, TensorDict(input=torch.randn(4, 3), batch_size=[4]))


@pytest.fixture(scope="session")
def gpt2():
    """A tiny Hugging Face GPT-2 (2 layers, width 32), batch 4 x 6 tokens."""
    return zoo.gpt2(n_layer=2, n_embd=32, n_head=2, batch=4, seq=6)
