"""LRP stays one graph: rules are statements of the program, printed, hook-free, compiled by
torch.compile without graph breaks and kept by torch.export; mistakes are refused with the place."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.lrp_helpers import rules
from tdhook_fx.errors import DslSyntaxError, ResolutionError, TdhookFxError
from tdhook_fx.shipping.export import export
from tdhook_fx.syntax.parse import parse
from tests.attribution.lrp.helpers import relevance, target
from tests.attribution.lrp.models import block, cnn, inputs

CNN_RULES = """rule 0 = alpha_beta(1, 0, 1e-06)
rule 1 = pass
rule 2 = pass
rule 4 = alpha_beta(2.0, 1.0)
rule 5 = pass
rule 6 = epsilon
rule 8 = epsilon(1e-06)"""
BLOCK_RULES = """rule ln1 = layer_norm
rule qkv = epsilon
rule scores = uniform_epsilon
rule softmax = softmax_epsilon
rule mix = uniform_epsilon
rule proj = epsilon
rule add1 = epsilon
rule ln2 = layer_norm
rule fc1 = w_square
rule act = pass
rule fc2 = flat
rule add2 = epsilon
rule head = epsilon"""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def input_relevance(function, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = function(x)
    out = out["output"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
    return torch.autograd.grad(out[:, 1].sum(), x)[0]


def test_the_method_compiles_rules_into_its_program_and_installs_nothing():
    model, x = cnn(), inputs("cnn")
    method = LRP(rule_mapper=rules.EpsilonPlus(), skip_modules=LRP.default_skip, init_attr_targets=target)
    with method.prepare(model) as hooked:
        hooked(TensorDict(input=x, batch_size=[3]))
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
        program, code = hooked.program, hooked.code
    assert program.splitlines()[:4] == ["rule 0 = alpha_beta(1.0, 0.0, 1e-06)", "rule 1 = pass", "rule 2 = pass", "rule 4 = alpha_beta(1.0, 0.0, 1e-06)"]
    assert "relevance_surrogate(rule_0, _0, input_1)" in code.replace("tdhook_fx_compiler_passes_relevance_surrogate", "relevance_surrogate")
    assert "relevance_times_input" in code and "relevance_epsilon_normalized" in code and "relevance_passed" in code


@pytest.mark.parametrize(("name", "program"), [("cnn", CNN_RULES), pytest.param("block", BLOCK_RULES, marks=pytest.mark.slow)])
def test_torch_compile_without_graph_breaks_and_export_keep_the_relevance(name, program, tmp_path):
    model, x = {"cnn": cnn, "block": block}[name](), inputs(name)
    compiled = tdhook_fx.compile(model, program, example=(x,))
    eager = input_relevance(compiled, x)
    explained = torch._dynamo.explain(compiled)(x.clone().requires_grad_(True))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch.testing.assert_close(input_relevance(torch.compile(compiled, fullgraph=True), x), eager, rtol=1e-4, atol=1e-5)
    export(compiled, tmp_path / "lrp.pt2", example=(x,))
    loaded = torch.export.load(tmp_path / "lrp.pt2").module()
    torch.testing.assert_close(input_relevance(loaded, x), eager)


def test_the_forward_is_unchanged():
    model, x = block(), inputs("block")
    compiled = tdhook_fx.compile(model, BLOCK_RULES, example=(x,))
    torch.testing.assert_close(compiled(x)["output"], model(x), rtol=1e-6, atol=1e-6)


def test_rule_statements_print_back():
    program = parse("rule features[0] = alpha_beta(2, 1, 1e-6)\nrule h[*].mlp@1 = epsilon()\nrule x = stop")
    assert str(program) == "rule features[0] = alpha_beta(2, 1, 1e-06)\nrule h[*].mlp@1 = epsilon\nrule x = stop"
    assert parse(str(program)) == program


@pytest.mark.parametrize(("program", "message"), [
    ("rule 0 = epsilom", "(?s)unknown rule 'epsilom'.*did you mean 'epsilon'"),
    ("rule 0 = epsilon(1, 2)", r"epsilon takes 1 argument: epsilon\(epsilon=1e-06\)"),
    ("rule 0 = alpha_beta(2, 2)", "alpha - beta = 1"),
    ("rule 0:in.input = epsilon", "a rule applies to a module, not to '0:in.input'"),
    ("rule 0 = epsilon\nrule 0 = pass", "0 already has a rule: rule 0 = epsilon"),
    ("rule 2 = w_square", "w_square changes the module's own parameters; ReLU has none"),
    ("rule 3 = pass", r"pass needs inputs shaped like the output"),
    ("rule 8 = ahqkv", "a multiple of 3"),
    ("rule 0 = layer_norm", "layer_norm needs a module with weight, bias and eps"),
])
def test_mistakes_are_refused_with_their_place(program, message):
    with pytest.raises(ResolutionError, match=message):
        tdhook_fx.compile(cnn(), program, example=(inputs("cnn"),))


def test_syntax_errors_know_the_rule_statement():
    with pytest.raises(DslSyntaxError, match="expected: a name"):
        parse("rule 0 = (1)")
    with pytest.raises(DslSyntaxError, match="did you mean 'rule'"):
        parse("rulez 0 = epsilon")
    with pytest.raises(DslSyntaxError, match="unexpected name 'a'"):
        parse("rule 0 = epsilon(a)")


def test_rules_of_the_method_layer_only():
    class NotARule:
        pass

    model, x = cnn(), inputs("cnn")
    with pytest.raises(TypeError, match="not a tdhook_fx rule"):
        relevance(LRP, rules, lambda r: r.BaseRuleMapper(rule_mapper=lambda n, m: NotARule()), model, x)
    whole = LRP(rule_mapper=lambda n, m: rules.EpsilonRule(), init_attr_targets=target).prepare(model)
    with pytest.raises(TdhookFxError, match="for the whole model"), whole as hooked:
        hooked(TensorDict(input=x, batch_size=[3]))


def test_missing_rules_warn_once_per_context_as_in_tdhook():
    model, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval(), torch.randn(2, 4)
    context = LRP(rule_mapper=lambda n, m: rules.EpsilonRule() if n == "0" else None, skip_modules=LRP.default_skip,
                  init_attr_targets=target).prepare(model)
    with pytest.warns(UserWarning, match=r"No rule found for module `1` \(Tanh\)"):
        hooked = context.__enter__()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calls do not warn again
        hooked(TensorDict(input=x, batch_size=[2]))
        hooked(TensorDict(input=x, batch_size=[2]))
    context.__exit__(None, None, None)
