"""TransformerLens names for the zoo's Hugging Face families resolve to the model's own sites."""

import pytest

import tdhook_fx
from tdhook_fx import zoo
from tests import zoo as test_zoo

FACTORIES = {"gpt2": test_zoo.gpt2, "gpt_neox": zoo.gpt_neox, "llama": test_zoo.llama, "bert": test_zoo.bert}
EXPECTED = {
    "gpt2": {
        "blocks.0.hook_resid_pre": "transformer.h.0:in.hidden_states",
        "blocks.0.hook_resid_mid": "transformer.h.0:add_0",
        "blocks.1.hook_resid_post": "transformer.h.1",
        "blocks.0.hook_attn_out": "transformer.h.0.attn:out.0",
        "blocks.0.hook_mlp_out": "transformer.h.0.mlp",
        "blocks.0.attn.hook_q": "transformer.h.0.attn:q",
        "blocks.0.attn.hook_pattern": "transformer.h.0.attn:pattern",
        "blocks.0.attn.hook_attn_scores": "transformer.h.0.attn:scores",
        "blocks.0.attn.hook_z": "transformer.h.0.attn.c_proj:in.x",
        "hook_embed": "transformer.wte",
        "hook_pos_embed": "transformer.wpe",
        "ln_final": "transformer.ln_f",
        "unembed": "lm_head",
    },
    "gpt_neox": {
        "blocks.1.hook_resid_post": "gpt_neox.layers.1",
        "blocks.0.attn.hook_v": "gpt_neox.layers.0.attention:v",
        "hook_embed": "gpt_neox.embed_in",
        "ln_final": "gpt_neox.final_layer_norm",
        "unembed": "lm_head",
    },
    "llama": {
        "blocks.0.hook_resid_mid": "model.layers.0:add_0",
        "blocks.0.attn.hook_k": "model.layers.0.self_attn:k",
        "ln_final": "model.norm",
        "unembed": "lm_head",
    },
    "bert": {
        "blocks.1.hook_resid_post": "encoder.layer.1",
        "blocks.0.attn.hook_pattern": "encoder.layer.0.attention.self:pattern",
        "hook_pos_embed": "embeddings.position_embeddings",
    },
}


@pytest.mark.parametrize("family", EXPECTED)
def test_transformer_lens_names_resolve_to_the_models_sites(family):
    sample = FACTORIES[family]()
    names = EXPECTED[family]
    program = "\n".join(f"save {name}" for name in names)
    cm = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert [i.site.name for i in cm.resolved.interventions] == list(names.values())
    listing = str(cm.resolved)
    assert all(f"save {name}" in listing for name in names)  # the alias shown with the site it stands for
    header = cm.code.split("\n\n")[0]  # cm.code starts by naming what each alias stands for
    assert all(f"#   {name} = " in header for name in names)


def test_selectors_and_indices_carry_over(samples):
    sample = samples("gpt2")
    cm = tdhook_fx.compile(sample.model, "set blocks[*].attn.hook_pattern[:, 1] = 0", example=sample.example,
                           in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert [i.site.name for i in cm.resolved.interventions] == ["transformer.h.0.attn:pattern", "transformer.h.1.attn:pattern"]
    assert all(i.index == (slice(None), 1) for i in cm.resolved.interventions)


def test_an_unknown_transformer_lens_name_suggests_ours(samples):
    sample = samples("gpt2")
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        tdhook_fx.compile(sample.model, "save blocks.0.hook_resid_pst", example=sample.example,
                          in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert "did you mean blocks.0.hook_resid_post = transformer.h.0" in str(raised.value)


@pytest.mark.parametrize(
    "family, name, hint",
    [
        ("gpt_neox", "blocks.0.hook_resid_mid", "in parallel"),
        ("llama", "blocks.0.mlp.hook_pre", "gated"),
        ("bert", "ln_final", "without a final norm"),
        ("bert", "unembed", "no unembedding"),
    ],
)
def test_a_name_the_family_lacks_says_why(family, name, hint):
    sample = FACTORIES[family]()
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        tdhook_fx.compile(sample.model, f"save {name}", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert f"has no site for the TransformerLens name '{name}'" in str(raised.value) and hint in str(raised.value)


def test_code_without_aliases_is_the_graphs_own(samples):
    sample = samples("gpt2")
    cm = tdhook_fx.compile(sample.model, "save transformer.h[0]", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert cm.code == cm.graph_module.code


def test_other_models_keep_their_own_names(samples):
    sample = samples("tiny_transformer")  # it has a module named `blocks`: no translation
    cm = tdhook_fx.compile(sample.model, "save blocks[0]", example=sample.example, in_keys=sample.in_keys,
                           out_keys=sample.out_keys)
    assert cm.resolved.interventions[0].site.name == "blocks.0"
