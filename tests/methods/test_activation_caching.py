"""ActivationCaching: the same TensorDict (and context cache) as tdhook 0.3.0, from one compiled pass."""

from __future__ import annotations

import pytest
import torch
from tdhook import latent as tdhook_latent

from tdhook_fx import latent
from tdhook_fx.errors import TdhookFxError, UnknownModulePath
from tests.methods.helpers import assert_same_tensordict, run_both


def test_mlp_matches_tdhook(mlp):
    expected, got = run_both(
        tdhook_latent.ActivationCaching("0|2"), latent.ActivationCaching("0|2"), mlp, mlp.example
    )
    assert_same_tensordict(expected, got)
    assert set(got["cache"].keys()) == {"0", "2"}


def test_gpt2_matches_tdhook(gpt2):
    pattern = r"transformer\.h\.\d+\.mlp$"
    expected, got = run_both(
        tdhook_latent.ActivationCaching(pattern), latent.ActivationCaching(pattern), gpt2, gpt2.example
    )
    assert_same_tensordict(expected, got)
    assert set(got["cache"].keys()) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}


def test_tuple_output_needs_a_callback_and_matches_with_one(gpt2):
    pattern = r"transformer\.h\.1\.attn$"
    with latent.ActivationCaching(pattern).prepare(
        gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
    ) as hooked:
        with pytest.raises(TdhookFxError, match="callback"):
            hooked(gpt2.example.clone())

    def first(**kwargs):
        return kwargs["output"][0]

    expected, got = run_both(
        tdhook_latent.ActivationCaching(pattern, callback=first),
        latent.ActivationCaching(pattern, callback=first),
        gpt2,
        gpt2.example,
    )
    assert_same_tensordict(expected, got)


def test_context_cache_options_match_tdhook(mlp):
    """`cache_key=None`, nested keys and the callback's keyword arguments, as tdhook."""
    seen = {}

    def callback(module, args, output, key, direction):
        seen.setdefault(key, []).append((type(module).__name__, tuple(a.shape for a in args), direction))
        return output * 2

    for make in (
        lambda lib: lib.ActivationCaching("0", cache_key=None, use_nested_keys=True, callback=callback),
        lambda lib: lib.ActivationCaching(r"\d", cache_key=("acts", "all")),
    ):
        caches = []
        for lib in (tdhook_latent, latent):
            context = make(lib).prepare(mlp.model)
            with context as hooked:
                td = hooked(mlp.example.clone())
            caches.append((context.cache, td))
        (expected_cache, expected_td), (cache, td) = caches
        assert_same_tensordict(expected_cache, cache)
        assert_same_tensordict(expected_td, td)
    assert seen[("fwd", "0")][0] == seen[("fwd", "0")][1] == ("Linear", ((4, 3),), "fwd")


def test_cache_is_cleared_on_enter_unless_told_not_to(mlp):
    method = latent.ActivationCaching("0$")
    context = method.prepare(mlp.model)
    with context as hooked:
        hooked(mlp.example.clone())
    context.cache["stale"] = torch.zeros(1)
    with context as hooked:
        assert "stale" not in context.cache.keys()
    kept = latent.ActivationCaching("0$", clear_cache=False, cache_key=None).prepare(mlp.model)
    kept.cache["mine"] = torch.zeros(1)
    with kept as hooked:
        hooked(mlp.example.clone())
    assert set(kept.cache.keys()) == {"mine", "0"}


def test_compiles_one_program_with_one_save_per_module(gpt2):
    with latent.ActivationCaching(r"transformer\.h\.\d+$").prepare(
        gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
    ) as hooked:
        hooked(gpt2.example.clone())
    assert hooked.program.splitlines() == [
        "save transformer.h.0 as saved_0",
        "save transformer.h.1 as saved_1",
    ]
    assert "hook" not in hooked.code


def test_a_pattern_that_matches_nothing_says_what_exists(gpt2):
    with latent.ActivationCaching(r"transformer\.layers\.\d+$").prepare(
        gpt2.model, in_keys=["input_ids"], out_keys=["logits"]
    ) as hooked:
        with pytest.raises(UnknownModulePath, match="matches no module") as error:
            hooked(gpt2.example.clone())
    assert "hint:" in str(error.value)


def test_outside_the_context_it_refuses(mlp):
    with latent.ActivationCaching("0").prepare(mlp.model) as hooked:
        pass
    with pytest.raises(RuntimeError, match="must be called in context"):
        hooked(mlp.example.clone())


def test_relative_false_and_a_caller_given_tensordict_module_match_tdhook(mlp):
    """Paths from the hook root (`module.1`), and a TensorDictModule whose keys are used as they are."""
    from tensordict import TensorDict
    from tensordict.nn import TensorDictModule

    expected, got = run_both(
        tdhook_latent.ActivationCaching(r"module\.1$", relative=False),
        latent.ActivationCaching(r"module\.1$", relative=False),
        mlp,
        mlp.example,
    )
    assert_same_tensordict(expected, got)
    wrapped = TensorDictModule(mlp.model, in_keys=["a"], out_keys=["b"])
    td = TensorDict(a=mlp.example["input"], batch_size=[4])
    results = []
    for lib in (tdhook_latent, latent):
        with lib.ActivationCaching(r"module\.(0|2)$").prepare(wrapped) as hooked:
            results.append(hooked(td.clone()))
    assert_same_tensordict(*results)
    assert set(results[1]["cache"].keys()) == {"module.0", "module.2"}


def test_disable_hooks_runs_the_plain_model(mlp):
    context = latent.ActivationCaching("0").prepare(mlp.model)
    with context as hooked:
        with context.disable_hooks():
            plain = hooked(mlp.example.clone())
        cached = hooked(mlp.example.clone())
    # as tdhook: the hooked module still publishes the cache, which the disabled call left empty
    assert len(plain["cache"].keys()) == 0 and "0" in cached["cache"].keys()
