"""A program split into its prefill and decoding programs: the printed programs, then the numbers."""

from __future__ import annotations

import torch

from tdhook_fx.generation.positions import plan_positions
from tdhook_fx.generation.run import Generation
from tdhook_fx.syntax.parse import parse

PROGRAM = """\
steer transformer.h[1].mlp += $v
steer transformer.h[0].mlp[:, 2:9] += $v
set transformer.h[0].mlp[:, 1] = zeros
save transformer.h[1].mlp[:, $pos] as at
steer transformer.h[1].mlp[:, 10] *= 2
save transformer.h[0]:out[..., 0:3] as features"""


def test_the_prefill_and_decoding_programs(lm):
    sample = lm("gpt2")
    ids = sample.example["input_ids"][:, :5]
    generation = Generation(sample.model, ids, None, 8)
    values = {"v": torch.ones(32), "pos": torch.tensor(6)}
    plan = plan_positions(parse(PROGRAM), generation.sites, generation.sequence_dims, values, 5)
    assert str(plan.prefill) == """\
steer transformer.h[1].mlp += $v
steer transformer.h[0].mlp[:, 2:5] += $v
set transformer.h[0].mlp[:, 1] = zeros
save transformer.h[0]:out[..., 0:3] as features"""
    assert str(plan.decode) == """\
steer transformer.h[1].mlp += $v
steer transformer.h[0].mlp[:, 0:1] += $gen_gate_0 * $v
save transformer.h[1].mlp[:, 0] as at
steer transformer.h[1].mlp[:, 0] *= $gen_gate_1 * 2 + (1 - $gen_gate_1)
save transformer.h[0]:out[..., 0:3] as features"""
    assert [plan.gate_values(p, "cpu")["gen_gate_0"].item() for p in (5, 8, 9)] == [1.0, 1.0, 0.0]
    assert [plan.keeps("at", p) for p in (5, 6, 7)] == [False, True, False]
    assert plan.saved["features"].dim == 1 and plan.saved["at"].dim is None
