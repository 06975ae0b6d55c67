"""The tdhook method API: contexts, keys, model wrappers, what is (not) changed, errors."""

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook_fx import TdhookFxError, zoo
from tdhook_fx.attribution import (
    ActivationMaximisation,
    GradCAM,
    GuidedBackpropagation,
    IntegratedGradients,
    Saliency,
)
from tdhook_fx.methods.programs import PROGRAMS
from tests.attribution.models import attribute, first_output, inputs, mlp


@pytest.fixture(scope="module")
def model():
    return mlp()


@pytest.fixture
def td():
    return TensorDict({"input": inputs("mlp")}, batch_size=[5])


def test_the_module_is_used_inside_its_context_only(model, td):
    context = Saliency(init_attr_targets=first_output).prepare(model)
    with context as hooked:
        assert hooked is context.module
        hooked(td)
        with pytest.raises(RuntimeError, match="Cannot enter a method context twice"):
            context.__enter__()
    with pytest.raises(RuntimeError, match="must be called in context"):
        hooked(td)
    with context as again:  # re-enterable
        again(td)


def test_no_hook_is_installed_and_the_inputs_are_left_alone(model, td):
    x = td["input"]
    gbp = GuidedBackpropagation(init_attr_targets=first_output, input_modules=["2"])
    with gbp.prepare(model) as hooked:
        hooked(td)
        hooks = [m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()]
    assert not any(hooks)
    assert not x.requires_grad and x.grad is None
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, never .backward()
    assert set(td.keys(include_nested=True, leaves_only=True)) == {"input", ("attr", "input"), ("attr", "2")}


def test_the_program_is_compiled_once_per_input_signature(td):
    with Saliency(init_attr_targets=first_output).prepare(mlp()) as hooked:  # a model no other test compiled
        before = PROGRAMS.compilations
        hooked(td)
        hooked(td.clone())
        assert PROGRAMS.compilations == before + 1
        hooked(TensorDict({"input": torch.randn(9, 6)}, batch_size=[9]))  # another shape: compiled again
        assert PROGRAMS.compilations == before + 2


def test_a_change_of_training_mode_is_followed():
    # Saliency once kept its own cache keyed on dtypes only, and kept running the eval graph (no
    # dropout) after model.train(); every method now compiles through one cache keyed on the mode too.
    sample = zoo.gpt2(n_layer=1, n_embd=16, n_head=2, batch=2, seq=5)
    model, td = sample.model, sample.example
    embeds = model.transformer.wte(td["input_ids"]).detach()
    td = TensorDict(embeds=embeds, batch_size=[2])

    def target(outputs, _):
        return TensorDict(t=outputs["logits"][:, -1, 0], batch_size=outputs.batch_size)

    method = Saliency(init_attr_targets=target)
    with method.prepare(model, in_keys={"inputs_embeds": "embeds"}, out_keys=["logits"]) as hooked:
        plain = hooked(td.clone())["attr", "embeds"]
        model.train()
        torch.manual_seed(1)
        first = hooked(td.clone())["attr", "embeds"]
        torch.manual_seed(2)
        second = hooked(td.clone())["attr", "embeds"]
        model.eval()
        again = hooked(td.clone())["attr", "embeds"]
    assert hooked.compiled is not None and not torch.equal(first, second)  # dropout draws differ
    assert not torch.allclose(first, plain)
    torch.testing.assert_close(again, plain)


def test_guided_backpropagation_clamps_every_module_input_in_its_program(model, td):
    with GuidedBackpropagation(init_attr_targets=first_output).prepare(model) as hooked:
        hooked(td)
        program = hooked.program
    assert program.splitlines() == [f"set grad {i}:in.input = $relu_0(value)" for i in range(5)]
    assert (td["attr", "input"] >= 0).all()


def test_activation_maximisation_computes_the_model_only_up_to_its_targets(model, td):
    maximise = ActivationMaximisation(["2"], n_steps=2, init_attr_targets=lambda t, _: TensorDict(o=t["2"][..., 0], batch_size=t.batch_size))
    with maximise.prepare(model) as hooked:
        hooked(td)
        compiled = hooked.compiled
    assert compiled.program.splitlines() == ["save 2 as target_0", "stop 2"]
    assert "model.4" not in compiled.code  # the last layer is not computed


def test_nested_attribution_key(model, td):
    result = attribute(Saliency(init_attr_targets=first_output, attribution_key=("res", "sal")), model, td)
    assert ("res", "sal", "input") in result.keys(include_nested=True, leaves_only=True)


def test_a_tensordict_module_brings_its_keys(model):
    wrapped = TensorDictModule(model, in_keys=["x"], out_keys=["y"])

    def target(outputs, _):
        return TensorDict(o=outputs["y"][..., 0], batch_size=outputs.batch_size)

    result = attribute(Saliency(init_attr_targets=target), wrapped, TensorDict(x=inputs("mlp"), batch_size=[5]))
    plain = attribute(Saliency(init_attr_targets=first_output), model, TensorDict(input=inputs("mlp"), batch_size=[5]))
    torch.testing.assert_close(result["attr", "x"], plain["attr", "input"])
    with pytest.raises(ValueError, match="Key z not in module.in_keys"):
        Saliency().prepare(wrapped, in_keys=["z"])


def test_dict_in_keys_pass_inputs_by_keyword():
    torch.manual_seed(30)

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Linear(2, 2)

        def forward(self, values=None, weights=None):
            return self.scale(values) * weights

    model = Keywords()
    td = TensorDict(v=torch.randn(3, 2), w=torch.randn(3, 2), batch_size=[3])
    result = attribute(Saliency(init_attr_targets=first_output), model, td, in_keys={"weights": "w", "values": "v"})
    v, w = td["v"].clone().requires_grad_(), td["w"].clone().requires_grad_()
    model(values=v, weights=w)[:, 0].sum().backward()
    torch.testing.assert_close(result["attr", "v"], v.grad)
    torch.testing.assert_close(result["attr", "w"], w.grad)


def test_integer_inputs_are_skipped_unless_asked_for(model):
    """A mask next to float inputs gets no attribution (tdhook would fail on it)."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, mask):
            return self.inner(x * mask)

    td = TensorDict(x=inputs("mlp"), mask=torch.ones(5, 6, dtype=torch.long), batch_size=[5])
    result = attribute(Saliency(init_attr_targets=first_output), Masked(), td, in_keys=["x", "mask"])
    assert set(result["attr"].keys()) == {"x"}
    with pytest.raises(TdhookFxError, match="cannot attribute to the input 'mask'"):
        attribute(Saliency(init_attr_targets=first_output, init_attr_inputs=lambda t, _: t), Masked(), td, in_keys=["x", "mask"])


def test_errors_name_the_fix(model, td):
    with pytest.raises(ValueError, match="Additional init keys must not be in the out_keys"):
        Saliency(additional_init_keys=["output"]).prepare(model)
    with pytest.raises(ValueError, match=r"returned a TensorDict of batch size \[\]; it was given batch size \[5\]"):
        attribute(Saliency(init_attr_targets=lambda t, _: TensorDict(t=t["output"].sum()), additional_init_keys=["input"]), model, td)
    with pytest.raises(TdhookFxError, match="cache_callback is not supported"):
        Saliency(cache_callback=lambda **kw: kw["output"])
    with pytest.raises(TdhookFxError, match="nothing to attribute to"):
        attribute(Saliency(use_inputs=False, init_attr_targets=first_output), model, td)
    with pytest.raises(ValueError, match="init_attr_targets function must return a TensorDict"):
        attribute(Saliency(init_attr_targets=lambda t, _: t["output"]), model, td)
    with pytest.raises(ValueError, match="Target target has no grad_fn"):
        attribute(Saliency(init_attr_targets=lambda t, _: TensorDict(target=torch.ones(5), batch_size=[5])), model, td)
    with pytest.raises(KeyError, match="no model input at 'input'"):
        attribute(Saliency(), model, TensorDict(other=torch.ones(5, 6), batch_size=[5]))


def test_init_attr_grads_weight_the_targets(model, td):
    def weights(targets, _):
        return TensorDict(target=torch.arange(5.0), batch_size=[5])

    weighted = attribute(Saliency(init_attr_targets=first_output, init_attr_grads=weights), model, td)
    plain = attribute(Saliency(init_attr_targets=first_output), model, td)
    torch.testing.assert_close(weighted["attr", "input"], plain["attr", "input"] * torch.arange(5.0)[:, None])


def test_grad_cam_on_a_module_port(samples):
    """A DSL port names one tensor of a tuple output (tdhook needs a cache_callback for that)."""
    sample = samples("tiny_transformer")

    def logit(outputs, _):
        return TensorDict(o=outputs["logits"][..., -1, 0], batch_size=outputs.batch_size)

    from tdhook_fx.attribution import DimsConfig

    cam = GradCAM({"blocks.0.attn:out.0": DimsConfig(feature_sum_dims=(2,))}, init_attr_targets=logit)
    result = attribute(cam, sample.model, sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert result["attr", "blocks.0.attn:out.0"].shape == sample.example["input_ids"].shape


def test_integrated_gradients_model_outputs_are_at_the_inputs(model, td):
    td["baseline", "input"] = torch.zeros(5, 6)
    with IntegratedGradients(init_attr_targets=first_output, n_steps=4).prepare(model) as hooked:
        outputs = hooked.outputs(td)
    torch.testing.assert_close(outputs["_mod_out", "output"], model(td["input"]))
