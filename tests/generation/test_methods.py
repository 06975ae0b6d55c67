"""hooked.generate for the one-pass methods, against HF generate with the same forward hooks; and
model.generate inside a method's context (applies the method, or names hooked.generate)."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import Saliency
from tdhook_fx.errors import GenerationError
from tdhook_fx.latent import ActivationCaching, ActivationPatching, SteeringVectors
from tdhook_fx.weights import Adapters, Pruning

KEYS = {"in_keys": ["input_ids"], "out_keys": ["logits"]}
NEW = 8


def hf_generate(model, ids, hooks=(), **options):
    """`model.generate` with forward hooks `(module, hook)` installed for the call."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, **options)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def gpt2(lm):
    sample = lm("gpt2")
    return sample.model, sample.example["input_ids"]


@pytest.fixture
def vector():
    return torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3


def test_steering_vectors_steer_every_token(gpt2, vector):
    model, ids = gpt2
    steer = SteeringVectors(["transformer.h.1.mlp"], lambda module_key, output: output + vector)
    want = hf_generate(model, ids, [(model.transformer.h[1].mlp, lambda m, i, o: o + vector)])
    assert want.tolist() != hf_generate(model, ids).tolist()
    with steer.prepare(model, **KEYS) as hooked:
        got = hooked.generate(TensorDict(input_ids=ids, batch_size=[2]), max_new_tokens=NEW, pad_token_id=0)
        assert "steer_fn_0" in hooked.code  # the decoding step
    assert got["sequences"].tolist() == want.tolist()


def test_sampling_with_a_seed_draws_the_tokens_hf_draws(gpt2, vector):
    model, ids = gpt2
    steer = SteeringVectors(["transformer.h.1.mlp"], lambda module_key, output: output + vector)
    torch.manual_seed(4)
    want = hf_generate(model, ids, [(model.transformer.h[1].mlp, lambda m, i, o: o + vector)], do_sample=True, top_p=0.8)
    with steer.prepare(model, **KEYS) as hooked:
        torch.manual_seed(4)
        got = hooked.generate(ids, max_new_tokens=NEW, pad_token_id=0, do_sample=True, top_p=0.8)
    assert got["sequences"].tolist() == want.tolist()


def test_model_generate_inside_the_context_applies_the_method(gpt2, vector):
    model, ids = gpt2
    steer = SteeringVectors(["transformer.h.1.mlp"], lambda module_key, output: output + vector)
    want = hf_generate(model, ids, [(model.transformer.h[1].mlp, lambda m, i, o: o + vector)])
    plain = hf_generate(model, ids)
    context = steer.prepare(model, **KEYS)
    with context:
        assert model.generate(ids, max_new_tokens=NEW, pad_token_id=0).tolist() == want.tolist()
        output = model.generate(ids, max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        assert output.sequences.tolist() == want.tolist() and len(output.logits) == NEW
        with context.disable_hooks():
            assert model.generate(ids, max_new_tokens=NEW, pad_token_id=0).tolist() == plain.tolist()
    assert "generate" not in model.__dict__
    assert hf_generate(model, ids).tolist() == plain.tolist()


def test_activation_caching_caches_the_whole_sequence(gpt2):
    model, ids = gpt2
    caching = ActivationCaching(r"transformer\.h\.\d+\.mlp$")
    with caching.prepare(model, **KEYS) as hooked:
        out = hooked.generate(ids, max_new_tokens=NEW, pad_token_id=0)
        one = hooked(TensorDict(input_ids=out["sequences"][:, :-1], batch_size=[2]))
    assert set(out["cache"].keys()) == {f"transformer.h.{i}.mlp" for i in range(2)}
    for key in out["cache"].keys():
        assert out["cache", key].shape[1] == 7 + NEW - 1
        torch.testing.assert_close(out["cache", key], one["cache", key], rtol=1e-4, atol=1e-5)


def test_pruning_generates_as_the_pruned_model(gpt2):
    model, ids = gpt2
    pruning = Pruning(lambda **kw: kw["parameter"].abs(), amount_to_prune=0.7, skip_modules=Pruning.default_skip)
    with pruning.prepare(model, **KEYS) as hooked:
        got = hooked.generate(ids, max_new_tokens=NEW, pad_token_id=0, output_logits=True)
        masks = pruning.masks
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in pruned.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    want = hf_generate(pruned, ids, return_dict_in_generate=True, output_logits=True)
    plain = hf_generate(model, ids, return_dict_in_generate=True, output_logits=True)
    assert got["sequences"].tolist() == want.sequences.tolist()
    torch.testing.assert_close(got["logits"], torch.stack(want.logits, 1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got["logits"], torch.stack(plain.logits, 1), atol=1e-2)


def test_adapters_apply_at_every_step(gpt2):
    model, ids = gpt2
    torch.manual_seed(2)
    adapter = nn.Linear(32, 32)
    with torch.no_grad():
        adapter.weight.mul_(4)
    adapters = Adapters({"a": (adapter, "transformer.h.1.mlp", "transformer.h.1.mlp")})
    with adapters.prepare(model, **KEYS) as hooked, torch.no_grad():
        got = hooked.generate(ids, max_new_tokens=NEW, pad_token_id=0)
    # The oracle runs outside the method's context: inside it, model.generate is hooked.generate
    # (which now refuses the oracle's own hook instead of comparing the method with itself).
    with torch.no_grad():
        want = hf_generate(model, ids, [(model.transformer.h[1].mlp, lambda m, i, o: adapter(o))])
    assert got["sequences"].tolist() == want.tolist()


def test_patching_names_hooked_generate_and_says_it_is_not_supported(gpt2):
    model, ids = gpt2
    with ActivationPatching(["transformer.h.0"]).prepare(model, **KEYS):
        with pytest.raises(GenerationError, match="hooked.generate") as error:
            model.generate(ids, max_new_tokens=2)
    assert "patching during generation is not supported" in str(error.value)


def test_an_attribution_context_names_hooked_generate(gpt2):
    model, ids = gpt2
    with Saliency().prepare(model, **KEYS), pytest.raises(GenerationError, match="hooked.generate"):
        model.generate(ids, max_new_tokens=2)


def test_unsupported_options_through_model_generate_name_hooked_generate(gpt2, vector):
    model, ids = gpt2
    steer = SteeringVectors(["transformer.h.1.mlp"], lambda module_key, output: output + vector)
    with steer.prepare(model, **KEYS):
        with pytest.raises(GenerationError, match="num_beams(.|\n)*hooked.generate"):
            model.generate(ids, max_new_tokens=2, num_beams=2)
