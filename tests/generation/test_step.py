"""The decoding step is a rewritten graph like any other: printed, exported to .pt2, torch.compile'd."""

from __future__ import annotations

import pytest
import torch

from tdhook_fx.generation.calls import decoding_step
from tests.generation.conftest import compiled


@pytest.fixture
def steered(lm):
    sample = lm("gpt2")
    v = torch.randn(32, generator=torch.Generator().manual_seed(5)) * 3
    return sample, compiled(sample, "steer transformer.h[1].mlp += $v", {"v": v})


def test_the_decoding_step_prints_its_program_and_code(lm):
    sample = lm("gpt2")
    cm = compiled(sample, "steer transformer.h[1].mlp += $v\nset transformer.h[0].mlp[:, 9] = zeros", {"v": torch.ones(32)})
    step = decoding_step(cm, sample.example["input_ids"], max_new_tokens=8)
    assert step.program == (
        "steer transformer.h[1].mlp += $v\n"
        "set transformer.h[0].mlp[:, 0] = $gen_gate_0 * zeros + (1 - $gen_gate_0) * value"
    )
    assert "def forward(self, input_ids, attention_mask, position_ids, cache_start, key_cache_0," in step.code
    assert "steer_transformer_h_1_mlp" in step.code and "index_copy_" in step.code


def test_the_exported_step_generates_the_same_tokens(steered, tmp_path):
    sample, cm = steered
    ids = sample.example["input_ids"]
    want = cm.generate(ids, max_new_tokens=6)["sequences"]
    step = decoding_step(cm, ids, max_new_tokens=6)
    step.export(tmp_path / "step.pt2")
    module = torch.export.load(tmp_path / "step.pt2").module()  # no tdhook_fx needed to run it
    _, mask, _, _, *cache = step.example_inputs
    cache = [torch.zeros_like(c) for c in cache]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    sequences, tokens, start = ids, ids, 0
    for _ in range(6):
        logits = module(tokens, mask, positions, torch.tensor(start), *cache)["logits"]
        start += tokens.shape[1]
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        positions = positions[:, -1:] + 1
        sequences = torch.cat([sequences, tokens], dim=1)
    assert sequences.tolist() == want.tolist()


@pytest.mark.slow
def test_torch_compile_compiles_the_decoding_step_once_without_graph_breaks(steered):
    from torch._dynamo.utils import counters

    sample, cm = steered
    ids = sample.example["input_ids"]
    eager = cm.generate(ids, max_new_tokens=12, output_logits=True)
    torch._dynamo.reset()
    counters.clear()
    fast = cm.generate(ids, max_new_tokens=12, output_logits=True, compile=True)
    again = cm.generate(ids, max_new_tokens=12, compile=True)
    assert fast["sequences"].tolist() == eager["sequences"].tolist() == again["sequences"].tolist()
    torch.testing.assert_close(fast["logits"], eager["logits"], rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step, both calls: no recompilation
