"""Adapters: modules spliced into the compiled graph, with tdhook's results."""

from __future__ import annotations

import pytest
import torch
from tdhook import weights as tdhook_weights
from torch import nn

from tdhook_fx import weights
from tdhook_fx.errors import TdhookFxError
from tests.methods.helpers import assert_same_tensordict, run_both


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x):
        return x * self.factor


class Gate(nn.Module):
    """Mixes the source value into the target's own output (uses tdhook's `output` keyword)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, output):
        return output + self.weight * x


def adapters_for(sample_name):
    if sample_name == "mlp":
        return [
            {"a": (Scale(10.0), "0", "0")},
            {"skip": (Scale(1.0), "0", "1")},
            {"gate": (Gate(), "0", "1"), "b": (Scale(-2.0), "2", "2")},
        ]
    return [
        {"a": (Scale(3.0), "transformer.h.0.mlp", "transformer.h.0.mlp")},
        {"resid": (Gate(), "transformer.h.0.mlp", "transformer.h.1.mlp")},
        {"lora": (nn.Linear(32, 32), "transformer.h.0", "transformer.h.1.attn.c_proj")},
    ]


@pytest.mark.parametrize("sample_name", ["mlp", "gpt2"])
def test_matches_tdhook(request, sample_name):
    sample = request.getfixturevalue(sample_name)
    for adapters in adapters_for(sample_name):
        expected, got = run_both(
            tdhook_weights.Adapters(adapters), weights.Adapters(adapters), sample, sample.example
        )
        assert_same_tensordict(expected, got, rtol=1e-4, atol=1e-5)


def test_skip_connection_program_and_cache(mlp):
    context = weights.Adapters({"skip": (Scale(1.0), "0", "1")}).prepare(mlp.model)
    with context as hooked:
        td = hooked(mlp.example.clone())
    assert hooked.program.splitlines() == [
        "save 0 as adapter_source_0",
        "set 1 = $adapter_0(value, @adapter_source_0)",
    ]
    model = mlp.model
    torch.testing.assert_close(td["output"], model[2](model[0](mlp.example["input"])))
    torch.testing.assert_close(context.cache["0_output"], model[0](mlp.example["input"]))


def test_adapters_train_through_the_compiled_graph(mlp):
    adapter = Scale(1.0)
    with weights.Adapters({"a": (adapter, "0", "0")}).prepare(mlp.model) as hooked:
        assert list(hooked.adapters.parameters()) == [adapter.factor]
        hooked(mlp.example.clone())["output"].sum().backward()
    assert adapter.factor.grad is not None and adapter.factor.grad.abs() > 0
    mlp.model.zero_grad()


def test_a_source_after_its_target_is_refused(mlp):
    with weights.Adapters({"late": (Scale(1.0), "2", "0")}).prepare(mlp.model) as hooked:
        with pytest.raises(TdhookFxError, match="does not run before its target"):
            hooked(mlp.example.clone())


def test_cache_callback_matches_tdhook(mlp):
    def halve(module, args, output, key, direction):
        return output / 2

    adapters = {"skip": (Scale(1.0), "0", "1")}
    contexts = []
    for lib in (tdhook_weights, weights):
        context = lib.Adapters(adapters, cache_callback=halve).prepare(mlp.model)
        with context as hooked:
            td = hooked(mlp.example.clone())
        contexts.append((context.cache, td))
    (expected_cache, expected), (cache, got) = contexts
    assert_same_tensordict(expected, got)
    assert_same_tensordict(expected_cache, cache)


def test_run_adds_its_statements_to_the_method_program(mlp):
    """A run() on a method's hooked module compiles the method's statements and the run's together."""
    with weights.Adapters({"a": (Scale(10.0), "0", "0")}).prepare(mlp.model) as hooked:
        with hooked.run(mlp.example.clone()) as run:
            scaled = run.save("0")
    assert hooked.program.splitlines() == ["set 0 = $adapter_0(value)", "save 0 as saved_0"]
    torch.testing.assert_close(scaled.resolve(), 10 * mlp.model[0](mlp.example["input"]))
