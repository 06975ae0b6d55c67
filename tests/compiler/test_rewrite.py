"""The rewritten graph: golden code for a few programs, and the structure the passes promise."""

import os
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx.testing import assert_equivalent
from tests import zoo

GOLDEN = Path(__file__).parent / "golden_code"
CASES = {
    "mlp_every_kind": ("mlp", "save 0\nsteer 2 += $alpha * $v\nset 4[:, 0] = 0\npatch 2[:, 3]\nprune 0.weight 50%"),
    "cnn_structured_prune": ("cnn", "prune 0.weight 25% along 0\nsave 2 as relu"),
    "gpt2_steer": ("gpt2", "save transformer.h[0]\nsteer transformer.h[1].mlp += $alpha * $v"),
}


def compile_case(samples, name, program):
    sample = samples(name)
    return tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_code(case, samples):
    compiled = compile_case(samples, *CASES[case])
    path = GOLDEN / f"{case}.py.txt"
    if os.environ.get("TDHOOK_FX_UPDATE_GOLDEN"):
        path.write_text(compiled.code)
    assert compiled.code == path.read_text()


def test_inserted_nodes_explain_themselves(samples):
    code = compile_case(samples, *CASES["gpt2_steer"]).code
    assert "steer_transformer_h_1_mlp = " in code
    assert "fit_transformer_h_1_mlp = tdhook_fx_compiler_passes_ops_fit(mul, transformer_h_1_mlp" in code
    assert "tap" not in code  # the capture's markers are gone


def test_stop_cuts_the_graph(samples):
    full = compile_case(samples, "gpt2", "save transformer.h[0]")
    stopped = compile_case(samples, "gpt2", "save transformer.h[0]\nstop transformer.h[0]")
    assert "lm_head = " in full.code and "lm_head = " not in stopped.code
    assert "transformer_h_1" not in stopped.code
    assert stopped.out_keys == []
    sample = samples("gpt2")
    out = stopped(sample.example.clone())
    assert "logits" not in out.keys() and ("saved", "transformer.h.0") in out.keys(include_nested=True)


def test_patch_runs_the_source_only_as_far_as_needed(samples):
    compiled = compile_case(samples, "gpt2", "patch transformer.h[0].mlp")
    source_nodes = [n for n in compiled.graph.nodes if n.name.startswith("patched_")]
    assert source_nodes, "the source run is part of the same graph"
    assert not any("h_1" in n.name or n.name == "patched_linear" for n in source_nodes)


def test_whole_set_leaves_no_dead_code(samples):
    compiled = compile_case(samples, "mlp", "set 2 = 0")
    # the first layers only fed layer 2, whose value is now a constant of its shape
    assert compiled.graph_module.code.count("linear") <= 3
    out = compiled(samples("mlp").example["input"])["output"]
    torch.testing.assert_close(out, samples("mlp").model[3:](torch.zeros(4, 16)))


def test_patch_source_run_keeps_in_place_ops_that_are_not_ancestors():
    """`h = lin1(x); h.mul_(2); lin2(h)`: the source run of `patch lin2` must run the mul_, which
    the patched site's node does not name as an input."""
    torch.manual_seed(5)
    model = zoo.InPlaceAfterSite().eval()
    td = TensorDict(input=torch.randn(4, 6), batch_size=[4])
    for program in ("patch lin2", "patch lin2[:, 1]", "patch lin1\npatch lin2"):
        assert_equivalent(model, program, td, sources={"patched": (torch.randn(4, 6),)})
