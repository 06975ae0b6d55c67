"""Sites inside modules: `M:add_0`, and attention's q/k/v/scores/pattern under SDPA.

Attention sites are checked against the hook reference on the same model built with eager
attention (Hugging Face's own `softmax(q k^T * scale + mask) @ v`), so the SDPA decomposition
must equal eager attention, not only the reference's own step-by-step version.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx import reference, zoo
from tdhook_fx.testing import assert_equivalent
from tests import zoo as test_zoo

# family -> (sample factory, the attention module of layer L)
FAMILIES = {
    "gpt2": (test_zoo.gpt2, "transformer.h[{}].attn"),
    "gpt_neox": (zoo.gpt_neox, "gpt_neox.layers[{}].attention"),
    "llama": (test_zoo.llama, "model.layers[{}].self_attn"),
    "bert": (test_zoo.bert, "encoder.layer[{}].attention.self"),
}


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def _attention_program(attention: str) -> str:
    a0, a1 = attention.format(0), attention.format(1)
    return f"""
        save {a0}:q
        save {a0}:k
        save {a0}:v
        save {a0}:scores
        set {a0}:pattern[:, 1] = 0
        save {a0}:pattern as ablated
        steer {a1}:k[:, 0] *= 2
        save {a1}:pattern
    """


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_sites_of_eager_attention_equal_the_reference_and_sdpa(family):
    # A model built with eager attention computes the pattern step by step: the same names
    # address those values (q and k the first product's operands, ..., v the second's).
    factory, attention = FAMILIES[family]
    sample = factory()
    eager, program = _eager(sample.model), _attention_program(attention)
    keys = dict(example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    got = tdhook_fx.compile(eager, program, **keys)(sample.example.clone())
    want = reference.run(eager, program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    fused = tdhook_fx.compile(sample.model, program, **keys)(sample.example.clone())
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[key], fused[key], rtol=1e-5, atol=1e-6)
    inside = tdhook_fx.sites(eager, **keys).inside(attention.format(0).replace("[", ".").replace("]", ""))
    assert {"q", "k", "v", "scores", "pattern"} <= {site.item for site in inside}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_sites_under_sdpa_equal_eager_attention(family):
    factory, attention = FAMILIES[family]
    sample = factory()
    a0 = attention.format(0)
    program = _attention_program(attention)
    compiled = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    got = compiled(sample.example)
    want = reference.run(_eager(sample.model), program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert set(want) <= set(got.keys(include_nested=True, leaves_only=True))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    heads = sample.model.config.num_attention_heads
    assert got["saved", "ablated"][:, 1].abs().max() == 0
    assert got["saved", f"{a0.replace('[', '.').replace(']', '')}:q"].shape[1] == heads


def test_only_touched_layers_lose_sdpa():
    sample = test_zoo.gpt2()
    cm = tdhook_fx.compile(sample.model, "save transformer.h[1].attn:pattern", example=sample.example,
                           in_keys=sample.in_keys, out_keys=sample.out_keys)
    fused = [n for n in cm.graph_module.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(fused) == 1 and fused[0].meta["nn_module_stack"]
    assert "transformer_h_1_attn_pattern" in cm.code
    q_only = tdhook_fx.compile(sample.model, "steer transformer.h[1].attn:q *= 2", example=sample.example,
                               in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert sum("scaled_dot_product_attention" in str(n.target) for n in q_only.graph_module.graph.nodes) == 2


def test_the_pattern_of_a_model_in_training_gets_dropout():
    sample = test_zoo.gpt2()
    model = copy.deepcopy(sample.model).train()
    cm = tdhook_fx.compile(model, "save transformer.h[0].attn:pattern", example=sample.example,
                           in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert "dropout" in cm.code.split("transformer_h_0_attn_pattern = ")[1].split("\n")[1]


class GroupedQueries(nn.Module):
    """SDPA with grouped-query attention (`enable_gqa`) and a causal flag, traced by fx."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(8, 8)

    def forward(self, x):
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, 4, 2).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, 4).transpose(1, 2).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, seq, 8)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = GroupedQueries()

    def forward(self, x):
        return self.attn(x)


@pytest.mark.parametrize(
    "program",
    ["save attn:pattern", "save attn:k\nsave attn:v", "set attn:pattern[:, 0] = 0", "steer attn:v *= 2\nsave attn:scores"],
)
def test_grouped_query_attention_repeats_key_heads(program):
    torch.manual_seed(0)
    model = Wrapper().eval()
    example = TensorDict(input=torch.randn(2, 5, 8), batch_size=[2])
    cm = assert_equivalent(model, program, example, rtol=1e-5, atol=1e-6)
    table = tdhook_fx.sites(model, example=example)
    assert table["attn:k"].shape == (2, 4, 5, 2)
    assert table["attn:pattern"].shape == (2, 4, 5, 5)
    assert cm.frontend == "fx"


def test_pattern_equals_the_fused_call_when_untouched():
    torch.manual_seed(0)
    model = Wrapper().eval()
    example = TensorDict(input=torch.randn(2, 5, 8), batch_size=[2])
    out = tdhook_fx.compile(model, "save attn:pattern", example=example)(example)
    torch.testing.assert_close(out["output"], model(example["input"]), rtol=1e-5, atol=1e-6)
    pattern = out["saved", "attn:pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 5))
    assert pattern[..., 0, 1:].abs().max() == 0  # causal


@pytest.mark.parametrize(
    "program",
    [
        "steer blocks[0]:add_0 += 1",
        "save blocks[1]:add_0\nset blocks[0].attn:softmax_0[:, 0] = 0",
        "patch blocks[0]:add_0[:, 1]",
        "save blocks[0].attn:matmul_0 as scores\nstop blocks[0].attn:matmul_1",
        "set blocks[0].attn:pattern[:, 1] = 0\nsteer blocks[1].attn:k *= 2\nsave blocks[1].attn:v\nsave blocks[1].attn:scores",
    ],
)
def test_operation_sites_equal_the_reference(program, samples):
    sample = samples("tiny_transformer")
    sources = {"patched": test_zoo.source_inputs(sample)} if "patch" in program else None
    assert_equivalent(sample.model, program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys,
                      sources=sources, rtol=1e-5, atol=1e-6)


def test_an_input_statement_is_not_counted_among_the_modules_own_operations(samples):
    # Found by the equivalence property on Llama: the reference entered the module's interceptor
    # before applying `steer M:in... += 0`, so the steer's own addition became M:add_0.
    sample = samples("llama")
    program = "steer model.layers.0.input_layernorm:in.hidden_states += 0\nsave model.layers.0.input_layernorm:add_0 as s1"
    assert_equivalent(sample.model, program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys,
                      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, program",
    [
        # Found by the thorough equivalence profile: the statement at a child's output ran in its
        # forward hook, after the child left the reference's call stack, so the parent's
        # interceptor counted the statement's own operation as the parent's.
        ("tiny_transformer", "steer blocks.0.attn:out.0 += 0\nsave blocks.0:add_0 as s1"),
        ("gpt_neox", "steer gpt_neox.layers.1.attention.query_key_value += 0\nsave gpt_neox.layers.1.attention:mul_0 as s1"),
    ],
)
def test_a_childs_output_statement_is_not_counted_among_the_parents_operations(name, program, samples):
    sample = samples(name)
    assert_equivalent(sample.model, program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys,
                      rtol=1e-5, atol=1e-6)


def test_gradients_at_the_pattern_equal_the_reference(samples):
    sample = samples("gpt2")
    program = "save grad transformer.h[0].attn:pattern\nset grad transformer.h[1].attn:q = 0"
    assert_equivalent(sample.model, program, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys,
                      backward=lambda out: out["logits"].square().sum(), rtol=1e-4, atol=1e-5)


def test_the_site_table_lists_a_modules_internal_sites(samples):
    sample = samples("gpt2")
    table = tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    inside = {s.item: s for s in table.inside("transformer.h.0.attn")}
    assert [n for n in inside if n in ("q", "k", "v", "scores", "pattern")] == ["q", "k", "v", "scores", "pattern"]
    assert inside["pattern"].describe() == "transformer.h.0.attn:pattern (attention pattern, 2x2x7x7, float32)"
    assert inside["scaled_dot_product_attention_0"].operation == "aten.scaled_dot_product_attention.default"
    assert [s.item for s in table.inside("transformer.h.0")] == ["add_0", "add_1"]
    assert "transformer.h.0:add_0" in table and "transformer.h.0:add_0" not in {s.name for s in table}
    names = [s.name for s in table.inside("transformer.h.1")]  # the same names in every layer
    assert names == ["transformer.h.1:add_0", "transformer.h.1:add_1"]


def test_an_unknown_internal_name_suggests_and_lists(samples):
    sample = samples("gpt2")
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        tdhook_fx.compile(sample.model, "save transformer.h[0].attn:patern", example=sample.example,
                          in_keys=sample.in_keys, out_keys=sample.out_keys)
    message = str(raised.value)
    assert "transformer.h.0.attn computes no value named 'patern'" in message
    assert "did you mean :pattern?" in message
    assert "values inside transformer.h.0.attn: :getitem_0" in message


def test_the_site_of_a_second_call_is_its_own(samples):
    sample = samples("tiny_transformer")
    table = tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert table.inside("blocks.0.act", 1) and all(s.name.startswith("blocks.0.act@1:") for s in table.inside("blocks.0.act", 1))


def test_the_readme_attention_example_runs(capsys):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = readme.split("Save every layer's pattern and ablate one head:\n\n```python\n")[1].split("```")[0]
    exec(compile(example, "README.md", "exec"), {})  # noqa: S102 - our own README
    printed = capsys.readouterr().out.splitlines()
    assert "transformer.h.0.attn:pattern (attention pattern, 2x2x6x6, float32)" in printed
    assert printed[-3:] == ["torch.Size([2, 2, 6, 6])", "tensor(0., grad_fn=<MaxBackward1>)", "1"]


def test_the_command_line_lists_internal_sites(capsys):
    from tdhook_fx.shipping.cli import main

    assert main(["sites", "gpt2", "transformer.h[0].attn", "--inside"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn:pattern (attention pattern" in out and "transformer.h.0.attn:q (" in out


class _Doubled(nn.Module):
    def forward(self, x):
        return x * 2


_DOUBLED = _Doubled()  # called by the block, held by no model (as transformers 5.25 wraps Llama's rotary code)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        h = self.linear(x)
        return _DOUBLED(h) + h * 3


def test_a_module_the_model_does_not_hold_is_its_callers_code():
    """Its operations are the calling module's own (`0:mul_0` is the doubling), in the graph and
    in the hook reference alike."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block()).eval()
    example = TensorDict(input=torch.randn(3, 4), batch_size=[3])
    sites = tdhook_fx.sites(model, example=example)
    assert [site.name for site in sites.inside("0")] == ["0:mul_0", "0:mul_1", "0:add_0"]
    assert_equivalent(model, "save 0:mul_0\nsave 0:mul_1\nsteer 0:mul_0 += 1\nsave 0:add_0", example)
    compiled = tdhook_fx.compile(model, "save 0:mul_0", example=example)
    h = model[0].linear(example["input"])
    torch.testing.assert_close(compiled(example.clone())["saved", "0:mul_0"], h * 2)
