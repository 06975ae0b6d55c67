"""save grad / set grad: graph rewrites that give what `Tensor.register_hook` gives, also compiled.

The core property (hypothesis, over the test zoo): for programs mixing every statement with
`save grad` and `set grad`, the saved gradients and the gradients of the inputs and parameters
through the compiled module equal those of the hook-based reference. Then: no graph break
under torch.compile, the calling API (`read_grads`), the order of grad statements at one site,
and the errors.
"""

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx.errors import BindingError, ResolutionError
from tdhook_fx.testing import assert_equivalent
from tests.compiler.properties import check_against_reference

# examples per model under the default profile (a thorough profile draws its own, more)
EXAMPLES = {"mlp": 20, "cnn": 8, "tiny_transformer": 4, "gpt2": 5, "bert": 5, "llama": 5, "minilm": 3}


def weighted_sum(result: dict) -> torch.Tensor:
    """A scalar that depends on every output and saved value, each element with its own weight."""
    total = torch.zeros(())
    for value in result.values():
        if value.is_floating_point():
            weights = torch.cos(torch.arange(value.numel(), dtype=value.dtype) * 0.37).reshape(value.shape)
            total = total + (value * weights).sum()
    return total


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny_transformer"])
def test_gradients_equal_register_hook(name, samples):
    check_against_reference(samples(name), grads=True, backward=weighted_sum, examples=EXAMPLES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "minilm"])
def test_gradients_equal_register_hook_on_hugging_face_models(name, samples):
    check_against_reference(samples(name), grads=True, backward=weighted_sum, examples=EXAMPLES[name])


# ---- torch.compile ------------------------------------------------------------------------------

GRAD_PROGRAMS = {
    "cnn": "save grad 1; set grad 2:in = $f(value) * $a; save grad 1 as again; set grad 4[:, 0] = zeros",
    "tiny_transformer": "save grad blocks[0].act@1; set grad blocks.1.attn:out.0 = $f(value) * $a; save grad blocks.1:in.x as g",
    "gpt2": "save grad transformer.h[0].mlp; set grad transformer.h[1].attn:out.0 = $f(value) * $a",
}


def graph_call(compiled, sample):
    """The graph module's own inputs: model inputs (floats requiring grad), runtime values, deltas."""
    inputs = [x.detach().requires_grad_() if x.is_floating_point() else x for x in (sample.example[k] for k in sample.in_keys)]
    deltas = list(compiled(*inputs)["_grad_delta"].values())
    runtime = [compiled._runtime(name, None) for name in compiled.runtime_names]
    return inputs, runtime, deltas


@pytest.mark.parametrize("name", ["cnn", pytest.param("tiny_transformer", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow)])
def test_no_graph_break_under_torch_compile(name, samples):
    sample = samples(name)
    compiled = tdhook_fx.compile(sample.model, GRAD_PROGRAMS[name], example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    compiled.bind(f=torch.relu, a=torch.tensor(0.5))
    inputs, runtime, deltas = graph_call(compiled, sample)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(compiled.graph_module)(*inputs, *runtime, *deltas)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    def gradients(module):
        outputs = module(*inputs, *runtime, *deltas)
        return torch.autograd.grad(weighted_sum(dict(enumerate(outputs))), [*deltas, *(x for x in inputs if x.requires_grad)])

    fused = torch.compile(compiled.graph_module, backend="aot_eager", fullgraph=True)
    for got, want in zip(gradients(fused), gradients(compiled.graph_module)):
        torch.testing.assert_close(got, want)


# ---- the calling API ----------------------------------------------------------------------------


@pytest.fixture
def mlp(samples):
    return samples("mlp")


def test_tensordict_call_then_backward_then_read_grads(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g; save grad 0", example=mlp.example)
    assert compiled.grad_names == ("g", "0.grad")
    td = compiled(mlp.example.clone())
    assert td["_grad_delta", "g"].shape == (4, 16) and td["_grad_delta", "g"].requires_grad
    td["output"][:, 0].sum().backward()
    out = compiled.read_grads(td)
    assert out is td and "_grad_delta" not in td.keys()  # noqa: SIM118 - a TensorDict has no `in`
    want = reference.run(mlp.model, "save grad 2 as g; save grad 0", (mlp.example["input"],), backward=lambda r: r["output"][:, 0].sum())
    torch.testing.assert_close(td["saved", "g"], want["saved", "g"])
    torch.testing.assert_close(td["saved", "0.grad"], want["saved", "0.grad"])


def test_tensor_call_then_autograd_grad(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2[:, 3:5] as g", example=mlp.example)
    result = compiled(mlp.example["input"])
    (grad,) = torch.autograd.grad(result["output"].sum(), list(result["_grad_delta"].values()))
    want = reference.run(mlp.model, "save grad 2[:, 3:5] as g", (mlp.example["input"],), backward=lambda r: r["output"].sum())
    torch.testing.assert_close(grad, want["saved", "g"])


def test_a_runtime_index_shapes_the_saved_gradient(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2[:, $i] as g", example=mlp.example)
    result = compiled(mlp.example["input"], i=torch.tensor([1, 4, 5]))
    assert result["_grad_delta"]["g"].shape == (4, 3)
    result["output"].sum().backward()
    assert compiled.read_grads(result)["saved"]["g"].shape == (4, 3)


def test_the_gradient_of_one_element(mlp):
    """A 0-dim gradient input is a real one (not the no-gradient placeholder)."""
    compiled = assert_equivalent(mlp.model, "save grad 2[1, 3] as g", mlp.example, backward=weighted_sum)
    with torch.enable_grad():
        result = compiled(mlp.example["input"])
        weighted_sum({"output": result["output"]}).backward()
    grad = compiled.read_grads(result)["saved"]["g"]
    assert grad.shape == () and grad != 0


def test_without_gradients_the_program_costs_nothing(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g; set grad 0 = zeros", example=mlp.example)
    with torch.no_grad():
        td = compiled(mlp.example.clone())
    assert "_grad_delta" not in td.keys()  # noqa: SIM118 - a TensorDict has no `in`
    torch.testing.assert_close(td["output"], mlp.model(mlp.example["input"]))
    with pytest.raises(BindingError, match="ran without gradients"):
        compiled.read_grads(td)


def test_read_grads_before_backward_says_what_to_do(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g", example=mlp.example)
    with pytest.raises(BindingError, match=r"call \.backward\(\)"):
        compiled.read_grads(compiled(mlp.example.clone()))


def test_a_site_the_backward_does_not_reach_has_a_zero_gradient(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save 0 as a\nsave grad 0:in as early\nsave grad 4 as late", example=mlp.example)
    td = compiled(mlp.example.clone())
    td["saved", "a"].sum().backward()  # from a value computed before site 4
    compiled.read_grads(td)
    assert torch.count_nonzero(td["saved", "early"]) > 0
    assert torch.count_nonzero(td["saved", "late"]) == 0


# ---- what the rewrite looks like -----------------------------------------------------------------


def test_printed_code_names_the_gradient_nodes(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g\nset grad 0 = value * $s", example=mlp.example)
    code = compiled.code
    assert "def forward(self, input, s, grad_g):" in code
    assert "receive_grad_g = tdhook_fx_compiler_passes_ops_receive_grad(" in code
    assert "grad_set_0 = tdhook_fx_compiler_passes_ops_override_grad(" in code and "self.set_grad_0" in code


def test_gradient_inputs_come_after_every_other_input(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g\npatch 0", example=mlp.example)
    names = [n.name for n in compiled.graph.nodes if n.op == "placeholder"]
    assert len(names) == 3 and names[-1] == "grad_g" and names[1].startswith("patched")
    source = torch.randn(4, 16)
    result = compiled(mlp.example["input"], patched=(source,))
    result["output"].sum().backward()
    want = reference.run(mlp.model, "save grad 2 as g\npatch 0", (mlp.example["input"],), sources={"patched": (source,)}, backward=lambda r: r["output"].sum())
    torch.testing.assert_close(compiled.read_grads(result)["saved"]["g"], want["saved", "g"])


# ---- grad statements at one site apply in program order (as hooks on one tensor do) -------------


@pytest.mark.parametrize(
    "program",
    [
        "set grad 2 = zeros\nsave grad 2 as g",  # the saved gradient is the replaced one
        "save grad 2 as g\nset grad 2 = zeros",  # the saved gradient is the incoming one
        "save grad 2 as g\nset grad 2 = value * 2\nsave grad 2 as h\nset grad 2 = value + 1",
        "set grad 2 = value * 3\nsteer 2 += 1\nsave grad 2 as g",  # a steer starts a new tensor
        "save grad 2 as g\nsave 2[0] as a\nset grad 2 = value * @a",  # reads a value saved at the site
    ],
)
def test_grad_statements_at_one_site_apply_in_program_order(mlp, program):
    assert_equivalent(mlp.model, program, mlp.example, backward=weighted_sum)


def test_set_grad_changes_the_input_gradient_as_a_hook_would(mlp):
    x = mlp.example["input"].clone().requires_grad_()
    compiled = tdhook_fx.compile(mlp.model, "set grad 1[:, :8] = -value", example=mlp.example)
    torch.autograd.backward(compiled(x)["output"].sum())
    y = mlp.example["input"].clone().requires_grad_()

    def flip(module, args, output):
        output = output.clone()
        output.register_hook(lambda g: torch.cat([-g[:, :8], g[:, 8:]], dim=1))
        return output

    handle = mlp.model[1].register_forward_hook(flip)
    mlp.model(y).sum().backward()
    handle.remove()
    torch.testing.assert_close(x.grad, y.grad)


# ---- errors ------------------------------------------------------------------------------------


def test_integer_sites_have_no_gradient(samples):
    sample = samples("tiny_transformer")
    with pytest.raises(ResolutionError, match="holds int64 values, which have no gradient") as error:
        tdhook_fx.compile(sample.model, "save grad embed:in", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert "use the embedding's output" in str(error.value)


def test_a_saved_gradient_cannot_be_used_in_the_forward(mlp):
    with pytest.raises(ResolutionError, match="is a saved gradient, which exists only after the backward pass"):
        tdhook_fx.compile(mlp.model, "save grad 0 as g\nsteer 2 += @g", example=mlp.example)


def test_gradient_names_are_unique(mlp):
    with pytest.raises(ResolutionError, match="'0.grad' is already saved") as error:
        tdhook_fx.compile(mlp.model, "save grad 0\nsave grad 0[:, 1]", example=mlp.example)
    assert "save grad 0[:, 1] as _0_grad_2" in str(error.value)


def test_a_set_grad_value_that_does_not_fit_fails_in_backward_with_the_statement(mlp):
    compiled = tdhook_fx.compile(mlp.model, "set grad 2 = $v", example=mlp.example)
    result = compiled(mlp.example["input"].requires_grad_(), v=torch.ones(3))
    with pytest.raises(BindingError, match=r"set grad 2 = \$v .*does not fit"):
        result["output"].sum().backward()


def test_tensordict_example_with_batch_size(mlp):
    compiled = tdhook_fx.compile(mlp.model, "save grad 2 as g", example=mlp.example)
    td = TensorDict(input=torch.randn(7, 16), batch_size=[7])
    compiled(td)["output"].sum().backward()
    assert compiled.read_grads(td)["saved", "g"].shape == (7, 16)
