"""Fixtures of the generation tests: small causal language models (random weights), built once per process."""

from __future__ import annotations

import pytest
import torch

import tdhook_fx
from tests import zoo

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(scope="session")
def lm():
    """`lm(name)`: the zoo's GPT-2 or Llama sample (batch 2, 7 tokens), built once."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = zoo.HUGGING_FACE[name]()
        return built[name]

    return get


def compiled(sample, program: str, values=None, length: int = 24):
    """`program` compiled on the sample's model, on an example `length` tokens long (so that position
    indices of the generated part are in range), with `values` bound."""
    ids = sample.example["input_ids"]
    example = torch.zeros(ids.shape[0], length, dtype=ids.dtype)
    cm = tdhook_fx.compile(sample.model, program, example=(example,), in_keys=["input_ids"], out_keys=["logits"])
    return cm.bind(**(values or {}))


def width(sample) -> int:
    return sample.model.config.hidden_size
