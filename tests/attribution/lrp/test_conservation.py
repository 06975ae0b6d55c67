"""Relevance conservation, layer by layer: without biases, what a rule passes back to a module's
inputs sums to what reached its output (read with `input_modules` at both ports)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.lrp_helpers import rules
from tests.attribution.lrp.helpers import MAPPERS, attn_lrp, target
from tests.attribution.lrp.models import block, cnn, inputs, mlp


def without_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    return model


def relevance_at_ports(model, x, mapper, modules: list[str]) -> tuple[dict, dict]:
    """({module: relevance reaching its output}, {module: relevances it passes to its inputs})."""
    from tdhook_fx.compiler.pipeline import sites

    table = sites(model, example=(x,))
    ports = {m: [s.name for s in table.activations(m, 0, "in")] for m in modules}
    method = LRP(rule_mapper=mapper(rules), skip_modules=LRP.default_skip, init_attr_targets=target,
                 input_modules=[*modules, *(p for names in ports.values() for p in names)], use_inputs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with method.prepare(model) as hooked:
            found = hooked(TensorDict(input=x, batch_size=[len(x)]))["attr"]
    per_example = lambda t: t.reshape(len(x), -1).sum(-1)
    outputs = {m: per_example(found[m]) for m in modules}
    given = {m: sum(per_example(found[p]) for p in ports[m]) for m in modules}
    return outputs, given


@pytest.mark.parametrize(("model_name", "mapper"), [
    ("mlp", "epsilon_plus"), ("mlp", "epsilon_plus_w_square"), ("cnn", "epsilon_plus"), ("cnn", "epsilon_alpha2_beta1"),
])
def test_each_layer_passes_on_what_it_receives(model_name, mapper):
    model = without_biases({"mlp": mlp, "cnn": cnn}[model_name]())
    modules = [name for name, _ in model.named_children()]
    outputs, given = relevance_at_ports(model, inputs(model_name), MAPPERS[mapper], modules)
    torch.testing.assert_close(outputs[modules[-1]], torch.ones(3))  # the target starts with relevance 1
    for name in modules:
        torch.testing.assert_close(given[name], outputs[name], rtol=1e-4, atol=1e-5, msg=f"module {name}")


def test_the_transformer_blocks_rules_conserve_except_the_softmax():
    """AttnLRP's rules for LayerNorm, products, sums and linear layers conserve relevance; the
    softmax rule (a Taylor decomposition with bias) does not, by design."""
    model = without_biases(block())
    conserving = ["ln1", "qkv", "scores", "mix", "proj", "add1", "ln2", "fc1", "act", "fc2", "add2", "head"]
    outputs, given = relevance_at_ports(model, inputs("block"), attn_lrp(epsilon=1e-9), [*conserving, "softmax"])
    for name in conserving:
        torch.testing.assert_close(given[name], outputs[name], rtol=1e-4, atol=1e-5, msg=f"module {name}")
    assert not torch.allclose(given["softmax"], outputs["softmax"], rtol=1e-3, atol=1e-3)
