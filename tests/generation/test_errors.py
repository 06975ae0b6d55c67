"""What generation refuses, and how it says so."""

from __future__ import annotations

import pytest
import torch

import tdhook_fx
from tdhook_fx import zoo as builtin
from tdhook_fx.errors import GenerationError
from tests.generation.conftest import compiled


@pytest.mark.parametrize(
    "text, words",
    [
        ("patch transformer.h[0].mlp", "patching from a source run is not supported"),
        ("save transformer.h[0].mlp as a\nstop transformer.h[0].mlp", "stops early"),
        ("steer transformer.h[0].mlp[:, -1] += 1", "negative position"),
        ("steer transformer.h[0].mlp[:, 3:] += 1", "has no end"),
        ("steer transformer.h[0].mlp[:, 0:9:2] += 1", "step"),
        ("save transformer.h[0].mlp[:, 3:4] as a\nsteer transformer.h[1].mlp += @a", "other positions"),
    ],
)
def test_statements_without_a_meaning_in_generation_are_refused(lm, text, words):
    sample = lm("gpt2")
    with pytest.raises(GenerationError, match=words):
        compiled(sample, text).generate(sample.example["input_ids"], max_new_tokens=4)


def test_a_tensor_of_positions_is_refused(lm):
    sample = lm("gpt2")
    cm = compiled(sample, "steer transformer.h[0].mlp[:, $at] += 1", {"at": torch.tensor([2, 3])})
    with pytest.raises(GenerationError, match="single integer"):
        cm.generate(sample.example["input_ids"], max_new_tokens=4)


@pytest.mark.parametrize("option", [{"num_beams": 2}, {"repetition_penalty": 1.3}, {"streamer": object()}])
def test_unsupported_generation_options_are_named(lm, option):
    sample = lm("gpt2")
    cm = compiled(sample, "save transformer.h[0].mlp as a")
    with pytest.raises(GenerationError, match=next(iter(option))):
        cm.generate(sample.example["input_ids"], max_new_tokens=4, **option)


def test_a_model_without_a_kv_cache_cannot_generate():
    sample = builtin.mlp()
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example)
    with pytest.raises(GenerationError, match="not a Hugging Face causal language model"):
        cm.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2)


def test_a_saved_position_the_generation_never_reaches_is_an_error(lm):
    sample = lm("gpt2")
    ids = sample.example["input_ids"]
    cm = compiled(sample, "save transformer.h[0].mlp[:, 12] as late")
    with pytest.raises(GenerationError, match="stopped after computing"):
        # every sequence ends with its first new token
        first = int(sample.model.generate(ids[:1], max_new_tokens=1, pad_token_id=0)[0, -1])
        cm.generate(ids[:1], max_new_tokens=8, eos_token_id=first)


def test_a_position_past_the_longest_generation_is_out_of_range(lm):
    sample = lm("gpt2")
    cm = compiled(sample, "save transformer.h[0].mlp[:, 20] as late")
    with pytest.raises(tdhook_fx.ResolutionError, match="index 20 is out of range .* [(]size 11[)]"):
        cm.generate(sample.example["input_ids"], max_new_tokens=5)  # computes 7 + 5 - 1 positions
