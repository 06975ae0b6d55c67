"""Memory: every cache is bounded, and a dropped model is freed at once (no reference cycles).

Before: site tables were kept per input shape without bound (about 75 KB each on GPT-2), so were
`save grad` shapes; fx's global cache of generated sources grew by about 200 KB a compile; and a
dropped model was held by reference cycles until the cycle collector ran (30 x 8 MB models held
255 MB until `gc.collect()`).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torch.fx import graph_module as fx_graph_module

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.compiler.capture import CAPTURES_PER_MODEL, SITE_TABLES_PER_CAPTURE
from tdhook_fx.compiler.compiled import DELTA_SHAPES_PER_MODULE
from tdhook_fx.compiler.lru import LRU
from tests import zoo


def test_an_lru_forgets_the_least_recently_used():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    with pytest.raises(tdhook_fx.TdhookFxError):
        LRU(0)


def test_site_tables_are_kept_for_a_bounded_number_of_input_shapes():
    sample = builtin_zoo.mlp()
    for batch in range(1, SITE_TABLES_PER_CAPTURE + 5):
        tdhook_fx.sites(sample.model, example=(torch.randn(batch, 16),))
    cm = tdhook_fx.compile(sample.model, "save 0", example=(torch.randn(2, 16),))
    assert len(cm.capture.site_tables) == SITE_TABLES_PER_CAPTURE


def test_captures_are_kept_for_a_bounded_number_of_model_states():
    from tdhook_fx.compiler.capture import _CACHE

    sample = builtin_zoo.mlp()
    for i in range(CAPTURES_PER_MODEL + 3):
        sample.model[2 * (i % 3)].train(i % 2 == 0)  # a new combination of modes each time
        sample.model.double() if i % 4 < 2 else sample.model.float()
        dtype = next(sample.model.parameters()).dtype
        tdhook_fx.sites(sample.model, example=(torch.randn(2, 16, dtype=dtype),))
    assert len(_CACHE[sample.model]) <= CAPTURES_PER_MODEL


def test_save_grad_shapes_are_kept_for_a_bounded_number_of_input_shapes():
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save grad 0 as g", example=sample.example)
    for batch in range(1, DELTA_SHAPES_PER_MODULE + 5):
        result = cm(torch.randn(batch, 16))
        result["output"].sum().backward()
        assert cm.read_grads(result)["saved"]["g"].shape == (batch, 16)
    assert len(cm._delta_shapes) == DELTA_SHAPES_PER_MODULE


def _compile_call_and_drop(name: str, frontend: str) -> list[weakref.ref]:
    """Weak references to a model, each of its tensors and a compiled module, all dropped."""
    if name == "mlp":
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)).eval()
        example = TensorDict(input=torch.randn(3, 8), batch_size=[3])
        keys = {}
        program = "steer 0 += 1\nprune 2.weight 50%\nsave 1"
    else:
        sample = zoo.gpt2()
        model, example, keys = sample.model, sample.example, dict(in_keys=sample.in_keys, out_keys=sample.out_keys)
        program = "steer transformer.h[0] += 1\nsave transformer.h[1]"
        del sample
    refs = [weakref.ref(t) for t in (model, *model.parameters(), *model.buffers())]
    cm = tdhook_fx.compile(model, program, example=example, frontend=frontend, **keys)
    refs.append(weakref.ref(cm))
    cm(example.clone())
    model.train()  # a second rewrite
    cm(example.clone())
    return refs


@pytest.mark.parametrize(("name", "frontend"), [("mlp", "fx"), ("mlp", "export"), ("gpt2", "export")])
def test_a_dropped_model_is_freed_without_the_cycle_collector(name, frontend):
    gc.collect()
    gc.disable()
    try:
        refs = _compile_call_and_drop(name, frontend)
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} of {len(refs)} objects kept alive: {[type(a).__name__ for a in alive]}"
    finally:
        gc.enable()


def test_generated_sources_are_forgotten_with_their_modules():
    cache = fx_graph_module._loader.eval_cache
    _compile_call_and_drop("mlp", "fx")  # warm: imports, lazily built parsers
    before = set(cache)
    for frontend in ("fx", "export"):
        _compile_call_and_drop("mlp", frontend)
    # no source made meanwhile is left (sources of modules freed meanwhile may be gone: a count
    # compared with the one before failed when a collection freed an earlier test's module)
    assert set(cache) <= before
