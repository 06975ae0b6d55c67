"""The site table names every addressable point the way programs refer to it."""

import tdhook_fx


def site_names(sample):
    return {s.name: s for s in tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)}


def test_quirks_get_canonical_names(samples):
    sites = site_names(samples("tiny_transformer"))
    # tuple outputs, keyword inputs, a module called twice, parameters
    assert {"blocks.0.attn:out.0", "blocks.0.attn:out.1"} <= set(sites)
    assert "blocks.0.attn:in.hidden_states" in sites
    assert {"blocks.0.act", "blocks.0.act@1", "blocks.0.act@1:in.input"} <= set(sites)
    assert sites["blocks.0.act@1"].call == 1
    assert sites["pos"].kind == "param" and sites["pos"].shape == (32, 16)
    assert sites["blocks.0.attn:out.1"].shape == (3, 2, 6, 6)
    assert sites["blocks.0.up"].order < sites["blocks.0.act"].order < sites["blocks.0.act@1"].order


def test_hugging_face_sites(samples):
    sites = site_names(samples("gpt2"))
    assert sites["transformer.h.0.mlp"].shape == (2, 7, 32)
    assert sites["transformer.h.0:in.hidden_states"].kind == "in"
    # GPT-2's tied embedding is one parameter reachable by both names
    assert sites["lm_head.weight"].shape == sites["transformer.wte.weight"].shape


def test_traced_only_sites_are_marked(samples):
    sites = site_names(samples("gpt2"))
    # Hugging Face builds an explicit attention mask only when traced
    mask = [s for s in sites.values() if "attention_mask" in s.name]
    assert mask and not any(s.eager for s in mask)
    assert sites["transformer.h.0.mlp"].eager


def test_describe_is_readable(samples):
    sites = site_names(samples("mlp"))
    assert sites["0"].describe() == "0 (out, 4x16, float32)"
