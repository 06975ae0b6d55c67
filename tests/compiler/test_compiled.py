"""CompiledModule: calling conventions, runtime values, and the errors a user can cause."""

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import reference


@pytest.fixture
def mlp(samples):
    return samples("mlp")


def compile_mlp(mlp, program):
    return tdhook_fx.compile(mlp.model, program, example=mlp.example)


def test_tensordict_call_writes_outputs_and_saved_values(mlp):
    compiled = compile_mlp(mlp, "save 0\nsave 2 as hidden")
    td = mlp.example.clone()
    out = compiled(td)
    assert out is td
    assert set(out.keys(include_nested=True, leaves_only=True)) == {"input", "output", ("saved", "0"), ("saved", "hidden")}
    torch.testing.assert_close(out["output"], mlp.model(mlp.example["input"]))


def test_tensor_call_returns_a_dict(mlp):
    compiled = compile_mlp(mlp, "save 2 as hidden")
    out = compiled(mlp.example["input"])
    assert set(out) == {"output", "saved"} and set(out["saved"]) == {"hidden"}


def test_runtime_values_from_tensordict_or_bind(mlp):
    compiled = compile_mlp(mlp, "steer 2 += $alpha * $v")
    v = torch.randn(16)
    compiled.bind(alpha=2.0, v=v)
    bound = compiled(mlp.example.clone())["output"]
    want = reference.run(mlp.model, "steer 2 += $alpha * $v", (mlp.example["input"],), values={"alpha": 2.0, "v": v})
    torch.testing.assert_close(bound, want["output"])
    # a per-example value in the TensorDict wins over the bound one
    td = mlp.example.clone()
    td["alpha"] = torch.zeros(4, 1)
    torch.testing.assert_close(compiled(td)["output"], mlp.model(mlp.example["input"]))


def test_changing_a_bound_value_needs_no_recompilation(mlp):
    compiled = compile_mlp(mlp, "steer 2 += $v")
    compiled.bind(v=torch.zeros(16))
    graph_module = compiled.graph_module
    first = compiled(mlp.example["input"])["output"]
    compiled.bind(v=torch.ones(16))
    second = compiled(mlp.example["input"])["output"]
    assert compiled.graph_module is graph_module
    assert not torch.allclose(first, second)
    assert "bound_v" in dict(compiled.named_buffers())


def test_missing_runtime_value_names_the_statement(mlp):
    compiled = compile_mlp(mlp, "save 0\nsteer 2 += $alpha * $v")
    compiled.bind(v=torch.ones(16))
    with pytest.raises(tdhook_fx.BindingError) as raised:
        compiled(mlp.example.clone())
    message = str(raised.value)
    assert "no value for $alpha" in message
    assert "steer 2 += $alpha * $v (program:2)" in message
    assert "cm.bind(alpha=value)" in message


def test_runtime_value_of_the_wrong_shape(mlp):
    compiled = compile_mlp(mlp, "steer 2 += $v").bind(v=torch.ones(7))
    with pytest.raises(tdhook_fx.BindingError) as raised:
        compiled(mlp.example["input"])
    message = str(raised.value)
    assert "steer 2 += $v (program:1)" in message
    assert "(7,)" in message and "(4, 16)" in message


def test_binding_an_unknown_name(mlp):
    compiled = compile_mlp(mlp, "steer 2 += $alpha")
    with pytest.raises(tdhook_fx.BindingError, match="did you mean 'alpha'"):
        compiled.bind(alpah=1.0)


def test_a_saved_value_that_does_not_fit_the_batch(samples):
    sample = samples("gpt2")
    compiled = tdhook_fx.compile(sample.model, "save transformer.wpe", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    with pytest.raises(tdhook_fx.TdhookFxError, match="does not start with the TensorDict's batch size"):
        compiled(sample.example.clone())
    unbatched = TensorDict(input_ids=sample.example["input_ids"], batch_size=[])
    assert compiled(unbatched)["saved", "transformer.wpe"].shape[0] == 1


def test_a_mode_change_is_followed(mlp):
    """`cm.train()` switches the (shared) model's mode, like `model.train()`; the call follows it."""
    compiled = compile_mlp(mlp, "save 0")
    try:
        compiled.train()
        assert compiled.training and mlp.model.training
        compiled(mlp.example["input"])
        compiled.eval()
        assert not compiled.training and not mlp.model.training
    finally:
        mlp.model.eval()


def test_training_mode_matches_eager_training(samples):
    sample = samples("cnn")
    model = sample.model
    model.train()
    try:
        compiled = tdhook_fx.compile(model, "save 1", example=sample.example)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out = compiled(sample.example["input"])["output"]
        after_compiled = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        eager = model(sample.example["input"])
        torch.testing.assert_close(out, eager)
        for key, value in model.state_dict().items():  # batch-norm statistics moved the same way
            torch.testing.assert_close(after_compiled[key], value)
        model.load_state_dict(state)
    finally:
        model.eval()


def test_patch_source_missing_from_the_tensordict(mlp):
    compiled = compile_mlp(mlp, "patch 2")
    with pytest.raises(tdhook_fx.BindingError, match=r"no patch source at key \('patched', 'input'\)"):
        compiled(mlp.example.clone())


def test_program_and_repr(mlp):
    compiled = compile_mlp(mlp, "steer  2 +=  $v   # comment")
    assert compiled.program == "steer 2 += $v"
    assert "steer 2 += $v" in repr(compiled)
    assert compiled.runtime_names == ("v",)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_runs_without_attribute_chains_and_follows_dtype_changes(frontend):
    """The eager call runs a copy of the graph with attribute paths resolved (tdhook_fx.compiler.runner);
    `.double()` replaces buffers (batch norm statistics), so the copy must be made again."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).eval()
    model[1].running_mean.uniform_(-1, 1)
    reference_model = copy.deepcopy(model).double()
    x = torch.randn(3, 4)
    compiled = tdhook_fx.compile(model, "steer 1 *= 2", example=(x,), frontend=frontend)
    torch.testing.assert_close(compiled(x)["output"], compiled.graph_module(x)[0])
    assert "getattr(" not in compiled.__dict__["_variant"].runner.code
    compiled.double()
    want = reference_model[2](2 * reference_model[1](reference_model[0](x.double())))
    torch.testing.assert_close(compiled(x.double())["output"], want)
