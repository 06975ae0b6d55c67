"""torch.compile(cm): one graph without breaks, no recompiles when runtime values change, and
changing the intervention after compiling takes effect (hooks added after compiling do not)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import tdhook_fx
from tdhook_fx import reference
from tests import zoo

PROGRAM = """
save transformer.h[*]
steer transformer.h[1] += $alpha * $v
patch transformer.h[0][:, $pos]
set transformer.h[1].mlp[:, $pos] = 0
"""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def gpt2(samples):
    sample = samples("gpt2")
    compiled = tdhook_fx.compile(
        sample.model, PROGRAM, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    compiled.bind(v=torch.randn(32, generator=torch.Generator().manual_seed(0)))
    return sample, compiled, zoo.source_inputs(sample)


def expected(sample, compiled, source, **values):
    return reference.run(
        sample.model, PROGRAM, (sample.example["input_ids"],), in_keys=sample.in_keys, out_keys=sample.out_keys,
        values={**compiled.bound_values(), **values}, sources={"patched": source},
    )


def assert_same(got: dict, want: dict):
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    for name, value in got["saved"].items():
        torch.testing.assert_close(value, want[("saved", name)], rtol=1e-4, atol=1e-5)


def test_one_graph_without_breaks_tensor_call(gpt2):
    sample, compiled, source = gpt2
    ids = sample.example["input_ids"]
    explained = torch._dynamo.explain(compiled)(ids, alpha=torch.tensor(2.0), pos=torch.tensor(3), patched=source)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_one_graph_without_breaks_tensordict_call(gpt2):
    sample, compiled, source = gpt2
    compiled.bind(pos=torch.tensor(2))
    td = sample.example.clone()
    td["alpha"] = torch.full((2, 1, 1), 0.5)  # per example
    td["patched", "input_ids"] = source[0]
    explained = torch._dynamo.explain(compiled)(td)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_new_runtime_values_do_not_recompile(gpt2):
    """Steering scale, steering vector (re-bound) and patch position change; one compilation serves all."""
    sample, compiled, source = gpt2
    ids = sample.example["input_ids"]
    counter = CompileCounter()
    run = torch.compile(compiled, backend=counter, fullgraph=True)
    for alpha, pos, new_v in [(2.0, 3, False), (-1.0, 0, False), (0.5, 6, True), (3.0, -1, True)]:
        if new_v:
            compiled.bind(v=torch.randn(32))
        values = {"alpha": torch.tensor(alpha), "pos": torch.tensor(pos)}
        assert_same(run(ids, patched=source, **values), expected(sample, compiled, source, **values))
    assert counter.frame_count == 1


def test_changing_the_intervention_after_compiling_takes_effect(gpt2):
    """Hook libraries: a hook registered after torch.compile is silently ignored. Here the
    intervention is data of the compiled module (bound values, functions), so a change made
    after compiling is applied: exactly, without recompiling for tensors, with one guarded
    recompile for a new Python function."""
    sample, compiled, source = gpt2
    ids = sample.example["input_ids"]
    run = torch.compile(compiled, backend="eager")
    values = {"alpha": torch.tensor(1.0), "pos": torch.tensor(2)}
    first = run(ids, patched=source, **values)
    assert_same(first, expected(sample, compiled, source, **values))

    compiled.bind(v=torch.full((32,), 3.0))  # a new steering vector, after compiling
    second = run(ids, patched=source, **values)
    assert_same(second, expected(sample, compiled, source, **values))
    assert not torch.allclose(first["logits"], second["logits"])

    program = "patch transformer.h[0] with $f"
    mixed = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    run_mixed = torch.compile(mixed, backend="eager")
    for weight in (0.25, 0.75):  # a new patch function after compiling
        mixed.bind(f=lambda target, source, w=weight: (1 - w) * target + w * source)
        got = run_mixed(ids, patched=source)
        want = reference.run(
            sample.model, program, (ids,), in_keys=sample.in_keys, out_keys=sample.out_keys,
            values=mixed.bound_values(), sources={"patched": source},
        )
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mlp_compiles_to_one_graph_with_inductor_equal_to_eager(samples):
    sample = samples("mlp")
    program = "save *\nsteer 2 += $v\npatch 0[:, $pos]"
    compiled = tdhook_fx.compile(sample.model, program, example=sample.example)
    compiled.bind(v=torch.randn(16))
    x, source = sample.example["input"], zoo.source_inputs(sample)
    explained = torch._dynamo.explain(compiled)(x, pos=torch.tensor(1), patched=source)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    run = torch.compile(compiled)
    for pos in (1, 5):
        got, want = run(x, pos=torch.tensor(pos), patched=source), compiled(x, pos=torch.tensor(pos), patched=source)
        torch.testing.assert_close(got["output"], want["output"], rtol=1e-5, atol=1e-6)
        for name in compiled.saved_names:
            torch.testing.assert_close(got["saved"][name], want["saved"][name], rtol=1e-5, atol=1e-6)


def _save_grad_module(sample):
    return tdhook_fx.compile(sample.model, "save grad 2\nsteer 2 += $v", example=sample.example)


def test_save_grad_under_torch_compile_equals_eager(samples):
    sample = samples("mlp")
    compiled = _save_grad_module(sample)
    compiled.bind(v=torch.randn(16))
    x = sample.example["input"]
    run = torch.compile(compiled, backend="aot_eager")
    with torch.enable_grad():
        eager = compiled(x)
        eager["output"].square().sum().backward()
        want = compiled.read_grads(eager)["saved"]["2.grad"]
        got = run(x)
        got["output"].square().sum().backward()
        torch.testing.assert_close(compiled.read_grads(got)["saved"]["2.grad"], want)


@pytest.mark.parametrize("call", ["tensors", "tensordict"])
def test_save_grad_compiles_to_one_graph(samples, call):
    sample = samples("mlp")
    compiled = _save_grad_module(sample)
    compiled.bind(v=torch.randn(16))
    given = sample.example["input"] if call == "tensors" else sample.example.clone()
    with torch.enable_grad():
        explained = torch._dynamo.explain(compiled)(given)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compile_method_gives_one_graph_with_save_grad(samples):
    sample = samples("mlp")
    eager = _save_grad_module(sample).bind(v=torch.randn(16))
    compiled = _save_grad_module(sample).bind(v=eager.bound_v).compile(backend=(counter := CompileCounter()))
    x = sample.example["input"]
    results = []
    for module in (eager, compiled):
        with torch.enable_grad():
            result = module(x)
            result["output"].sum().backward()
        results.append(module.read_grads(result))
    assert counter.frame_count == 1
    torch.testing.assert_close(results[1]["output"], results[0]["output"])
    for name in eager.grad_names:
        torch.testing.assert_close(results[1]["saved"][name], results[0]["saved"][name])


def test_a_new_position_in_set_grad_does_not_recompile(samples):
    """`set grad SITE[:, $pos]`: the position reaches the backward rule as a tensor, not a constant."""
    sample = samples("mlp")
    compiled = tdhook_fx.compile(sample.model, "set grad 2[:, $pos] = zeros", example=sample.example)
    counter = CompileCounter()
    run = torch.compile(compiled, backend=counter)
    for position in (1, 2, 3):
        got, want = (sample.example["input"].clone().requires_grad_() for _ in range(2))
        run(got, pos=torch.tensor(position))["output"].sum().backward()
        compiled(want, pos=torch.tensor(position))["output"].sum().backward()
        torch.testing.assert_close(got.grad, want.grad)
    assert counter.frame_count == 1
