"""Capture: which front end each model gets, caching, dynamic shapes, and failures explained."""

import pytest
import torch
from torch import nn

import tdhook_fx
from tdhook_fx.compiler.capture import capture

EXPECTED_FRONTEND = {"mlp": "fx", "cnn": "fx", "tiny_transformer": "export", "gpt2": "export", "bert": "export", "llama": "export"}


def compile_empty(sample, **kwargs):
    return tdhook_fx.compile(sample.model, "", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys, **kwargs)


@pytest.mark.parametrize("name", sorted(EXPECTED_FRONTEND))
def test_auto_picks_the_front_end_and_reproduces_the_model(name, samples):
    sample = samples(name)
    compiled = compile_empty(sample)
    assert compiled.frontend == EXPECTED_FRONTEND[name]
    result = compiled(sample.example.clone())
    with torch.no_grad():
        eager = sample.model(*[sample.example[k] for k in sample.in_keys])
    eager = eager if isinstance(eager, torch.Tensor) else eager[sample.out_keys[0]]
    torch.testing.assert_close(result[sample.out_keys[0]], eager, rtol=1e-5, atol=1e-5)


def test_capture_is_cached_per_signature(samples):
    sample = samples("gpt2")
    inputs = (sample.example["input_ids"],)
    first, _ = capture(sample.model, inputs, sample.in_keys, sample.out_keys)
    again, _ = capture(sample.model, inputs, sample.in_keys, sample.out_keys)
    assert again is first
    other_keys, _ = capture(sample.model, inputs, sample.in_keys, ["logits", "past_key_values"][:1] + [], "export")
    assert other_keys is not first  # another front-end choice is another signature


def test_a_cached_capture_and_site_table_run_nothing(samples, monkeypatch):
    """The per-call path of the method layer: a cache hit neither runs the model nor copies its buffers."""
    from tdhook_fx.compiler import capture as capture_module

    sample = samples("cnn")
    inputs = (sample.example["input"],)
    first = capture(sample.model, inputs, ["input"], ["output"])
    monkeypatch.setattr(capture_module, "_model_state_kept", None)  # any use of it would fail
    assert capture(sample.model, inputs, ["input"], ["output"]) == first


@pytest.mark.parametrize("name", ["gpt2", "tiny_transformer", "cnn"])
def test_other_batch_and_sequence_sizes_run_without_recapture(name, samples):
    sample = samples(name)
    compiled = compile_empty(sample)
    graph_module = compiled.graph_module
    x = sample.example[sample.in_keys[0]]
    if x.is_floating_point():
        bigger = torch.randn(5, *x.shape[1:])
    else:
        bigger = torch.randint(0, int(x.max()) + 1, (5, x.shape[1] + 3))
    out = compiled(bigger)[sample.out_keys[0]]
    with torch.no_grad():
        eager = sample.model(bigger)
    eager = eager if isinstance(eager, torch.Tensor) else eager[sample.out_keys[0]]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert compiled.graph_module is graph_module


def test_an_example_of_size_one_still_gives_a_dynamic_batch(samples):
    sample = samples("gpt2")
    one = sample.example[:1]
    compiled = tdhook_fx.compile(sample.model, "save transformer.h[0]", example=one, in_keys=sample.in_keys, out_keys=sample.out_keys, frontend="export")
    ids = torch.randint(0, 100, (3, 5))
    out = compiled(ids)
    assert out["saved"]["transformer.h.0"].shape[:2] == (3, 5)


def test_fx_on_a_model_it_cannot_trace_explains_what_to_try(samples):
    sample = samples("gpt2")
    with pytest.raises(tdhook_fx.CaptureError) as raised:
        compile_empty(sample, frontend="fx")
    message = str(raised.value)
    assert "could not capture GPT2LMHeadModel" in message
    assert "fx:" in message and "hint:" in message and "frontend='export'" in message


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor value: neither front end can capture it
            return x * 2
        return x - 1


def test_a_model_no_front_end_can_capture():
    with pytest.raises(tdhook_fx.CaptureError) as raised:
        tdhook_fx.compile(DataDependent(), "", example=torch.ones(2, 3))
    message = str(raised.value)
    assert "fx:" in message and "export:" in message


def test_a_failing_model_call_names_the_keys():
    with pytest.raises(tdhook_fx.CaptureError, match="the model failed on the example inputs"):
        tdhook_fx.compile(nn.Linear(3, 2), "", example=torch.ones(2, 4))


def test_out_keys_that_the_output_lacks(samples):
    sample = samples("gpt2")
    with pytest.raises(tdhook_fx.CaptureError, match="has no tensor 'hidden'"):
        tdhook_fx.compile(sample.model, "", example=sample.example, in_keys=sample.in_keys, out_keys=["hidden"])


def test_example_without_the_in_keys(samples):
    sample = samples("gpt2")
    with pytest.raises(tdhook_fx.BindingError, match="has no 'input'"):
        tdhook_fx.compile(sample.model, "", example=sample.example)


def test_replacing_a_submodule_invalidates_the_cached_capture(samples):
    sample = samples("mlp")
    model = sample.model
    original = model[2]
    try:
        first = tdhook_fx.compile(model, "save 2", example=sample.example)
        x = sample.example["input"]
        before = first(x)["saved"]["2"]
        model[2] = nn.Linear(16, 16)
        second = tdhook_fx.compile(model, "save 2", example=sample.example)
        torch.testing.assert_close(second(x)["saved"]["2"], model[:3](x))
        assert not torch.allclose(before, second(x)["saved"]["2"])
        torch.testing.assert_close(first(x)["saved"]["2"], second(x)["saved"]["2"])  # the first one follows
    finally:
        model[2] = original


def test_the_capture_cache_does_not_keep_models_alive():
    import gc
    import weakref

    from tdhook_fx import zoo

    sample = zoo.mlp()
    compiled = tdhook_fx.compile(sample.model, "save 0", example=sample.example)
    model = weakref.ref(sample.model)
    del sample
    gc.collect()
    assert compiled(torch.randn(2, 16))["saved"]["0"].shape == (2, 16)  # the module holds its model
    del compiled
    gc.collect()
    assert model() is None  # the capture cache does not
