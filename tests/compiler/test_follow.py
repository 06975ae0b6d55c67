"""A compiled module follows its model: dtypes, modes, edits, replaced tensors and submodules.

After each change a call must give what the hook reference gives on the changed model (and so
what a fresh compile gives). Every test builds its own model: they change it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.compiler.compiled import VARIANTS_PER_MODULE
from tdhook_fx.methods.hooked import HookedModule
from tests import zoo

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _cast_inputs(sample, model) -> tuple:
    dtype = _model_dtype(model)
    return tuple(
        sample.example[k].to(dtype) if sample.example[k].is_floating_point() else sample.example[k] for k in sample.in_keys
    )


def assert_follows(cm, sample, program: str, values: dict | None = None) -> None:
    """`cm` called on the sample's inputs (cast to the model's dtype) gives the reference's result."""
    model = sample.model
    inputs = _cast_inputs(sample, model)
    dtype = _model_dtype(model)
    values = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (values or {}).items()}
    want = reference.run(model, program, inputs, in_keys=sample.in_keys, out_keys=sample.out_keys, values=values)
    got = cm(*inputs, **values)
    tol = TOLERANCE[dtype]
    for key, expected in want.items():
        value = got["saved"][key[1]] if isinstance(key, tuple) else got[key]
        assert value.dtype == expected.dtype, key
        torch.testing.assert_close(value, expected, rtol=tol, atol=tol)


def _mlp_with_norm(frontend_seed: int = 0) -> builtin_zoo.Sample:
    torch.manual_seed(frontend_seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return builtin_zoo.Sample(model, TensorDict(input=torch.randn(5, 8), batch_size=[5]))


PROGRAM = "steer 1 += $v\nsave 0"


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dtype_casts_of_the_model_are_followed(frontend):
    sample = _mlp_with_norm()
    cm = tdhook_fx.compile(sample.model, PROGRAM, example=sample.example, frontend=frontend)
    values = {"v": torch.randn(8)}
    assert_follows(cm, sample, PROGRAM, values)
    for cast in (nn.Module.double, nn.Module.bfloat16, nn.Module.float):
        cast(sample.model)
        assert_follows(cm, sample, PROGRAM, values)


def test_half_and_bfloat16_on_a_hugging_face_model():
    """GPT-2's exported graph bakes float32 and the CPU into about ten nodes (asserts, arange):
    the module captures again for the new state."""
    sample = zoo.gpt2()
    program = "steer transformer.h[0] += $v\nsave transformer.h[1].mlp"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    values = {"v": torch.randn(32)}
    sample.model.bfloat16()
    assert_follows(cm, sample, program, values)
    sample.model.float()
    assert_follows(cm, sample, program, values)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_every_dtype_on_hugging_face_models(name):
    sample = zoo.HUGGING_FACE[name]()
    site = {"gpt2": "transformer.h[0]", "bert": "encoder.layer[0]", "llama": "model.layers[0]"}[name]
    program = f"steer {site} *= 2\nsave {site} as block"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    for cast in (nn.Module.half, nn.Module.bfloat16, nn.Module.double, nn.Module.float):
        cast(sample.model)
        assert_follows(cm, sample, program)
        fresh = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
        inputs = _cast_inputs(sample, sample.model)
        torch.testing.assert_close(cm(*inputs)["saved"]["block"], fresh(*inputs)["saved"]["block"], rtol=0, atol=0)


def test_cm_to_converts_the_model_its_bound_values_and_masks():
    sample = builtin_zoo.mlp()
    program = "steer 0 += $v\nprune 2.weight 50%"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example).bind(v=torch.randn(16))
    cm.to(torch.float64)
    assert _model_dtype(sample.model) == torch.float64
    assert cm.bound_values()["v"].dtype == torch.float64
    assert all(mask.dtype == torch.float64 for mask in cm.graph_tensors().values())
    assert_follows(cm, sample, program, {"v": cm.bound_values()["v"]})


def test_pruning_masks_follow_a_cast_of_the_model_alone():
    sample = builtin_zoo.mlp()
    program = "prune 0.weight 50%\nsave 0"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example)
    sample.model.double()
    assert_follows(cm, sample, program)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_modes_are_followed_by_both_front_ends(frontend):
    """Compiled in eval mode, then `model.train()`: batch norm uses the batch's statistics and
    updates the running ones, as the eager model does; `cm.training` says so."""
    sample = _mlp_with_norm()
    model = sample.model
    cm = tdhook_fx.compile(model, "save 1", example=sample.example, frontend=frontend)
    assert not cm.training
    model.train()
    assert cm.training
    eager = copy.deepcopy(model)
    eager(sample.example["input"])  # one training step's update of the running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = reference.run(model, "save 1", sample.example)
    model.load_state_dict(before)
    got = cm(sample.example["input"])
    torch.testing.assert_close(got["saved"]["1"], want[("saved", "1")])
    torch.testing.assert_close(got["output"], want["output"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[key])
    model.eval()
    assert not cm.training
    assert_follows(cm, sample, "save 1")


def test_a_mode_set_on_one_submodule_is_followed():
    sample = _mlp_with_norm()
    cm = tdhook_fx.compile(sample.model, "save 1", example=sample.example, frontend="export")
    sample.model[1].train()
    model_state = {k: v.clone() for k, v in sample.model.state_dict().items()}
    want = reference.run(sample.model, "save 1", sample.example)
    sample.model.load_state_dict(model_state)
    torch.testing.assert_close(cm(sample.example["input"])["saved"]["1"], want[("saved", "1")])


def test_a_custom_branch_on_the_mode_is_followed_by_the_fx_front_end():
    """fx bakes a Python `if self.training:` of a traced-through module into the graph."""

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            y = self.linear(x)
            return y * 2 if self.training else y

    model = nn.Sequential(Noisy(), nn.Linear(4, 4)).eval()
    sample = builtin_zoo.Sample(model, TensorDict(input=torch.randn(3, 4), batch_size=[3]))
    cm = tdhook_fx.compile(model, "save 0", example=sample.example, frontend="fx")
    model.train()
    assert_follows(cm, sample, "save 0")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_in_place_edits_replaced_tensors_and_shapes_are_followed(frontend):
    sample = _mlp_with_norm()
    model = sample.model
    cm = tdhook_fx.compile(model, PROGRAM, example=sample.example, frontend=frontend)
    values = {"v": torch.randn(8)}
    with torch.no_grad():
        model[0].weight.mul_(-2)  # an in-place edit
    assert_follows(cm, sample, PROGRAM, values)
    state = {k: v.clone() + 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new parameter and buffer objects
    assert_follows(cm, sample, PROGRAM, values)
    model[3].weight.data = torch.randn(2, 8)  # the same parameter object, another shape
    model[3].bias.data = torch.randn(2)
    assert_follows(cm, sample, PROGRAM, values)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_buffers_replaced_by_a_cast_and_back_are_read_again(frontend):
    sample = _mlp_with_norm()
    cm = tdhook_fx.compile(sample.model, "save 1", example=sample.example, frontend=frontend)
    sample.model.double().float()  # same dtype as captured, new buffer objects
    with torch.no_grad():
        sample.model[1].running_mean.fill_(0.25)
    assert_follows(cm, sample, "save 1")


def test_a_replaced_submodule_whose_site_is_gone_is_an_error():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = nn.Sequential(Inner(), nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    cm = tdhook_fx.compile(model, "save 0.lin", example=(x,))
    model[0] = nn.Linear(4, 4)
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        cm(x)
    assert "the model changed since this module was compiled" in "".join(getattr(raised.value, "__notes__", []))


def test_variants_are_bounded():
    sample = _mlp_with_norm()
    cm = tdhook_fx.compile(sample.model, "save 1", example=sample.example, frontend="export")
    for i in range(VARIANTS_PER_MODULE + 3):
        sample.model[1].train(i % 2 == 0)
        sample.model[0].train(i % 3 == 0)
        sample.model.double() if i % 4 < 2 else sample.model.float()
        cm(_cast_inputs(sample, sample.model)[0])
    assert len(cm._variants) <= VARIANTS_PER_MODULE


def test_a_hooked_module_follows_to():
    sample = builtin_zoo.mlp()
    hooked = HookedModule(sample.model)
    with hooked.run(sample.example.clone()) as run:
        run.save("1")
    hooked.to(torch.float64)
    td = TensorDict(input=sample.example["input"].double(), batch_size=[4])
    with hooked.run(td) as run:
        saved = run.save("1")
    want = reference.run(sample.model, "save 1", (td["input"],))
    torch.testing.assert_close(saved.resolve(), want[("saved", "1")])


@pytest.mark.parametrize("sample_name", ["mlp", "gpt2"])
def test_autocast_works(sample_name):
    sample = builtin_zoo.mlp() if sample_name == "mlp" else zoo.gpt2()
    site = "0" if sample_name == "mlp" else "transformer.h[0]"
    program = f"steer {site} *= 2\nsave {site} as block"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    inputs = tuple(sample.example[k] for k in sample.in_keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.run(sample.model, program, inputs, in_keys=sample.in_keys, out_keys=sample.out_keys)
        got = cm(*inputs)
    assert got["saved"]["block"].dtype == want[("saved", "block")].dtype
    torch.testing.assert_close(got["saved"]["block"], want[("saved", "block")])
    torch.testing.assert_close(got[sample.out_keys[0]], want[sample.out_keys[0]])


def test_save_grad_follows_a_cast():
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save grad 0 as g", example=sample.example)
    sample.model.double()
    x = sample.example["input"].double().requires_grad_()
    result = cm(x)
    result["output"].sum().backward()
    grads = cm.read_grads(result)["saved"]
    want = reference.run(sample.model, "save grad 0 as g", (x,), backward=lambda r: r["output"].sum())
    assert grads["g"].dtype == torch.float64
    torch.testing.assert_close(grads["g"], want[("saved", "g")])


def test_the_tensordict_call_follows_too():
    sample = _mlp_with_norm()
    cm = tdhook_fx.compile(sample.model, "save 1", example=sample.example, frontend="export")
    sample.model.double()
    td = TensorDict(input=sample.example["input"].double(), batch_size=[5])
    want = reference.run(sample.model, "save 1", (td["input"],))
    torch.testing.assert_close(cm(td)["saved", "1"], want[("saved", "1")])


def test_a_module_compiled_on_a_model_nobody_else_holds_keeps_it():
    """`cm = compile(Model(), ...)`: the module keeps the model (its base_model, and following it)."""
    cm = tdhook_fx.compile(builtin_zoo.mlp().model, "save 0", example=(torch.randn(4, 16),))
    import gc

    gc.collect()
    cm.base_model.double()
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(cm(x)["saved"]["0"], cm.base_model[0](x))


def test_cm_compile_is_what_eager_calls_run():
    """`cm.compile(...)` puts the graph under torch.compile for every later call (the generated
    eager call path defers to it), and again after the model changes state."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example).compile(backend=backend)
    x = sample.example["input"]
    torch.testing.assert_close(cm(x)["saved"]["0"], sample.model[0](x))
    assert len(graphs) == 1
    sample.model.double()
    torch.testing.assert_close(cm(x.double())["saved"]["0"], sample.model[0](x.double()))
    assert len(graphs) == 2
