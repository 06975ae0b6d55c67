"""The conftest for tdhook 0.3.0's own test files, run against tdhook_fx (copied next to them).

`import tdhook.X` gives `tdhook_fx.X`: a meta-path finder placed first answers every `tdhook`
module with the tdhook_fx module of the same name (so the tdhook installed next to tdhook_fx is
never imported). `tdhook.runtime` and `tdhook.hooks` also carry tdhook's hook-runtime names,
which fail when used (see `tests.tdhook_suite.hook_runtime`). The fixtures are tdhook's (its sdist ships the tests without their conftest):
`default_test_model` and `get_model`, a three-layer MLP.
"""

import importlib
import importlib.abc
import importlib.util
import sys

import pytest
import torch
from torch import nn

from tests.tdhook_suite import hook_runtime

STUBS = {"tdhook.runtime": hook_runtime.runtime_module, "tdhook.hooks": hook_runtime.hooks_module}


class _TdhookAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "tdhook" or name.startswith("tdhook."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        if spec.name in STUBS:
            return STUBS[spec.name]()
        return importlib.import_module("tdhook_fx" + spec.name[len("tdhook"):])

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _TdhookAlias())
for _name in [n for n in sys.modules if n == "tdhook" or n.startswith("tdhook.")]:
    del sys.modules[_name]


class TestModel(nn.Module):
    __test__ = False

    def __init__(self, input_size=10, hidden_size=20, output_size=5):
        super().__init__()
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, output_size)
        self.activation = nn.ReLU()

    def forward(self, x):
        x = self.activation(self.linear1(x))
        x = self.activation(self.linear2(x))
        return self.linear3(x)


@pytest.fixture
def default_test_model():
    return TestModel()


@pytest.fixture
def get_model():
    def make(*, seed=42, input_size=10, hidden_size=20, output_size=5):
        torch.manual_seed(seed)
        return TestModel(input_size, hidden_size, output_size)

    return make
