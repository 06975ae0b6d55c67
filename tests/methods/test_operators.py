"""tdhook's helper names at its import paths: operators, integration helpers, path grammar."""

from __future__ import annotations

import pytest
import torch
from tdhook import modules as tdhook_modules
from tdhook import paths as tdhook_paths
from tdhook.attribution.gradient_helpers import helpers as tdhook_helpers
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import nn

from tdhook_fx import hooks, modules, paths
from tdhook_fx.attribution.gradient_helpers import helpers


@pytest.mark.parametrize("method", tdhook_helpers.SUPPORTED_METHODS)
def test_integration_points_are_tdhooks(method):
    assert helpers.SUPPORTED_METHODS == tdhook_helpers.SUPPORTED_METHODS
    assert helpers.SUPPORTED_RIEMANN_METHODS == tdhook_helpers.SUPPORTED_RIEMANN_METHODS
    ours, theirs = helpers.approximation_parameters(method), tdhook_helpers.approximation_parameters(method)
    for n in (2, 7, 50):
        assert ours[0](n) == theirs[0](n) and ours[1](n) == theirs[1](n)
    with pytest.raises(ValueError):
        helpers.approximation_parameters("simpson")


def pipeline(lib):
    cache_ref = hooks.MutableWeakRef(TensorDict()) if lib is modules else tdhook_modules.MutableWeakRef(TensorDict())

    class Writer(TensorDictModuleBase):
        in_keys, out_keys = ["input"], ["output"]

        def forward(self, td):
            cache_ref.resolve().set("hidden", td["input"] * 2)
            return td.set("output", td["input"] + 1)

    inner = TensorDictModule(lambda v: v - 1, in_keys=["value"], out_keys=["result"])
    return [
        lib.ModuleCallWithCache(Writer(), stored_keys=["hidden"], cache_key="cache", out_key="prediction", cache_ref=cache_ref),
        lib.ModuleCall(inner, in_key="source", out_key="called"),
        lib.FunctionModule(lambda td: td.set("doubled", td["input"] * 2), ["input"], ["doubled"]),
        lib.IntermediateKeysCleaner(["source"]),
    ]


def test_operators_do_what_tdhooks_do():
    results = []
    data = TensorDict({"input": torch.randn(2, 3, 4), "source": {"value": torch.randn(2, 3, 4)}}, batch_size=[2, 3])
    for lib in (tdhook_modules, modules):
        td = data.clone()
        for operator in pipeline(lib):
            td = operator(td)
        results.append(td)
    theirs, ours = results
    assert set(ours.keys(True, True)) == set(theirs.keys(True, True))
    for key in theirs.keys(True, True):
        torch.testing.assert_close(ours[key], theirs[key])


def test_pgd_steps_are_tdhooks():
    class Grad(TensorDictModuleBase):
        in_keys, out_keys = ["x"], ["x", "_grad"]

        def forward(self, td):
            return td.set("_grad", TensorDict({"x": td["x"] - 0.3}, batch_size=td.batch_size))

    results = []
    x = torch.randn(4, 2)
    for lib in (tdhook_modules, modules):
        module = lib.PGDModule(Grad(), alpha=0.2, n_steps=3, min_value=-1, max_value=0.5, use_sign=False, working_key=None)
        results.append(module(TensorDict(x=x.clone(), batch_size=[4]))["x"])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize(
    "path", ["", "a", "a.b", "items[1]", "items[-1]", "items[0:2]", "data['k']", "<odd/name>[0]", "m.0", "m.1"]
)
def test_paths_resolve_as_tdhooks(path):
    class Node:
        pass

    root = Node()
    root.a = Node()
    root.a.b = "leaf"
    root.items = [1, 2, 3]
    root.data = {"k": "v"}
    setattr(root, "odd/name", ["odd"])
    root.m = nn.ModuleList([nn.ReLU(), nn.Tanh()])
    assert paths.resolve_submodule_path(root, path) == tdhook_paths.resolve_submodule_path(root, path)
    assert paths.submodule_path_to_name(path) == tdhook_paths.submodule_path_to_name(path)


@pytest.mark.parametrize("path", ["fn()", "items[0] + 1", "items.", "<", "items[a:]", "prop"])
def test_bad_paths_are_refused_without_running_anything(path):
    class Root:
        ran = False

        @property
        def prop(self):
            Root.ran = True

        def fn(self):
            Root.ran = True

    with pytest.raises(ValueError):
        paths.resolve_submodule_path(Root(), path)
    with pytest.raises(ValueError):
        tdhook_paths.resolve_submodule_path(Root(), path)
    assert not Root.ran


def test_best_device_and_cache_proxy_are_where_tdhook_keeps_them():
    assert modules.get_best_device() == tdhook_modules.get_best_device()
    from tdhook_fx.methods.run import CacheProxy

    assert hooks.CacheProxy is CacheProxy
