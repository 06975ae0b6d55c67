"""passes/split.py: a captured graph cut at a site recomposes to the model, and costs what it should."""

import pytest
import torch

import tdhook_fx
from tdhook_fx.compiler.capture import capture
from tdhook_fx.errors import TdhookFxError
from tdhook_fx.perf.split import cut

CASES = {
    "mlp": ["0", "2", "4"],
    "cnn": ["0", "2", "5", "9"],  # in-place ReLU: the order-keeping cut
    "tiny_transformer": ["blocks.0", "blocks.1.attn:out.0", "blocks.0.act@1"],
    "gpt2": ["transformer.h.0", "transformer.h.1.mlp", "transformer.h.1:in.hidden_states"],
}


def captured(sample):
    inputs = tuple(sample.example[k] for k in sample.in_keys)
    graph, table = capture(sample.model, inputs, sample.in_keys, sample.out_keys)
    return graph, table, inputs


@pytest.mark.parametrize("name", list(CASES))
def test_prefix_then_suffix_is_the_model(name, samples):
    sample = samples(name)
    graph, _, inputs = captured(sample)
    sites = CASES[name]
    pieces = cut(graph.graph_module, sites)
    with torch.no_grad():
        want = graph.graph_module(*inputs)
        outputs = pieces.prefix(*inputs)
        values = pieces.values_only(*inputs)
        for i, site in enumerate(sites):
            torch.testing.assert_close(values[i], outputs[i])
            got = pieces.suffixes[site](outputs[i], *pieces.frontier_values(site, outputs))
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
    assert pieces.mutates == (name == "cnn")


def test_suffix_computes_from_the_given_site_value(samples):
    sample = samples("mlp")
    graph, _, inputs = captured(sample)
    pieces = cut(graph.graph_module, ["2"])
    value = torch.randn(4, 16)
    with torch.no_grad():
        got = pieces.suffixes["2"](value, *pieces.frontier_values("2", pieces.prefix(*inputs)))[0]
        torch.testing.assert_close(got, sample.model[4](sample.model[3](value)))


def test_suffix_holds_only_what_follows_the_site(samples):
    """GPT-2 cut after block 0: the suffix never touches block 0's weights; the prefix stops at the site."""
    sample = samples("gpt2")
    graph, _, _ = captured(sample)
    pieces = cut(graph.graph_module, ["transformer.h.0"])
    suffix_params = {n.target for n in pieces.suffixes["transformer.h.0"].graph.nodes if n.op == "get_attr"}
    prefix_params = {n.target for n in pieces.prefix.graph.nodes if n.op == "get_attr"}
    assert suffix_params and not any(".h.0." in t or "wpe" in t for t in suffix_params)
    assert prefix_params and not any(".h.1." in t or "ln_f" in t for t in prefix_params)


def test_unknown_site_is_refused(samples):
    graph, _, _ = captured(samples("mlp"))
    with pytest.raises(TdhookFxError, match="no such activation site"):
        cut(graph.graph_module, ["nope"])


def test_fused_patch_runs_the_source_only_up_to_the_patched_site(samples):
    """`patch` compiles one graph: its source copy stops at the patched site (issue 7, item 1)."""
    sample = samples("gpt2")
    compiled = tdhook_fx.compile(
        sample.model, "patch transformer.h[0]", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    source_params = {
        n.target for n in compiled.graph.nodes if n.op == "get_attr" and n.name.startswith("patched_")
    }
    assert any(".h.0." in t for t in source_params)
    assert not any(".h.1." in t or "ln_f" in t for t in source_params)
