"""Caches as tdhook 0.3.0 keeps them: memory-mapped and locked caches written in place, `clear()`,
backward directions filled by the caller's backward, and the last call's values kept."""

from __future__ import annotations

import pytest
import torch
from tdhook import latent as tdhook_latent
from tensordict import TensorDict

from tdhook_fx import latent
from tdhook_fx.errors import InvalidArgument, MethodUsageError
from tests.methods.helpers import assert_same_tensordict


def preallocated(mlp) -> TensorDict:
    return TensorDict({"0": torch.zeros(4, 5), "2": torch.zeros(4, 2)}, batch_size=[])


def test_a_memory_mapped_cache_is_written_in_place_as_tdhook_writes_it(mlp, tmp_path):
    results = []
    for lib, folder in ((tdhook_latent, "tdhook"), (latent, "tdhook_fx")):
        cache = preallocated(mlp).memmap_(tmp_path / folder)
        storage = cache["0"]
        with lib.ActivationCaching(r"^(0|2)$", cache=cache, clear_cache=False).prepare(mlp.model) as hooked:
            td = hooked(mlp.example.clone())
        assert cache.is_memmap() and cache["0"] is storage  # the same memory-mapped tensor, now filled
        results.append((cache.clone(), td))
    assert_same_tensordict(results[0][0], results[1][0])
    assert_same_tensordict(results[0][1], results[1][1])
    assert torch.count_nonzero(results[1][0]["0"]) > 0


def test_a_locked_cache_needs_every_key_and_clear_cache_false(mlp):
    locked = TensorDict({"0": torch.zeros(4, 5)}, batch_size=[]).lock_()
    with pytest.raises(InvalidArgument, match="clear_cache=False"):
        latent.ActivationCaching("0", cache=locked)
    with latent.ActivationCaching(r"^(0|2)$", cache=locked, clear_cache=False).prepare(mlp.model) as hooked:
        with pytest.raises(MethodUsageError, match="preallocated entry for '2'"):
            hooked(mlp.example.clone())


def test_clear_empties_the_cache(mlp):
    context = latent.ActivationCaching("0", clear_cache=False).prepare(mlp.model)
    with context as hooked:
        hooked(mlp.example.clone())
    assert "0" in context.cache.keys()
    context.clear()
    assert len(context.cache.keys()) == 0


def test_a_cache_keeps_the_last_call_as_tdhooks_does(mlp):
    caches = []
    for lib in (tdhook_latent, latent):
        context = lib.ActivationCaching("0").prepare(mlp.model)
        with context as hooked:
            hooked(mlp.example.clone())
            hooked(TensorDict(input=torch.ones(2, 3), batch_size=[2]))
        caches.append(context.cache)
    assert_same_tensordict(*caches)
    assert caches[1]["0"].shape == (2, 5)


def grad_callbacks():
    def picks(module, key, direction, grad_output, **kwargs):
        chosen = kwargs["grad_input"][0] if direction == "bwd" else grad_output[0]
        return chosen * 1.0

    return picks


@pytest.mark.parametrize("direction", ["bwd", "bwd_pre"])
def test_backward_directions_are_cached_after_the_callers_backward(mlp, direction):
    caches = []
    for lib in (tdhook_latent, latent):
        context = lib.ActivationCaching(r"^(1|2)$", directions=[direction], callback=grad_callbacks()).prepare(mlp.model)
        x = mlp.example["input"].clone().requires_grad_()
        with context as hooked:
            td = hooked(TensorDict(input=x, batch_size=[4]))
            td["output"].pow(2).sum().backward()
        caches.append(context.cache)
    assert_same_tensordict(*caches)
    assert set(caches[1].keys()) == {"1", "2"}


def test_probes_step_on_gradients_when_the_backward_reaches_them(mlp):
    seen = {}
    for name, lib in (("tdhook", tdhook_latent), ("tdhook_fx", latent)):
        steps = seen[name] = []

        class Probe:
            def step(self, data, **kwargs):
                steps.append(tuple(g.clone() for g in data))

        x = mlp.example["input"].clone().requires_grad_()
        with lib.Probing(r"^(0|2)$", lambda key, direction: Probe(), directions=["bwd_pre"]).prepare(mlp.model) as hooked:
            td = hooked(TensorDict(input=x, batch_size=[4]))
            assert steps == []  # nothing before the backward
            td["output"].sum().backward()
    assert len(seen["tdhook"]) == len(seen["tdhook_fx"]) == 2
    for expected, got in zip(seen["tdhook"], seen["tdhook_fx"]):
        torch.testing.assert_close(got, expected)


def test_a_backward_after_the_block_fills_nothing_as_tdhooks_removed_hooks(mlp):
    context = latent.ActivationCaching("2", directions=["bwd_pre"]).prepare(mlp.model)
    x = mlp.example["input"].clone().requires_grad_()
    with context as hooked:
        td = hooked(TensorDict(input=x, batch_size=[4]))
    td["output"].sum().backward()
    assert len(context.cache.keys()) == 0


def test_the_hooked_module_is_tdhooks_activation_caching_module(mlp):
    from tdhook_fx.latent.activation_caching import ActivationCachingModule

    with latent.ActivationCaching("0", cache_key=("a", "b")).prepare(mlp.model) as hooked:
        assert isinstance(hooked, ActivationCachingModule)
        assert hooked.out_keys == ["output", ("a", "b")]
