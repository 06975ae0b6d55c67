"""Our attributions equal captum's (within 1e-5) on an MLP, a CNN and GPT-2's embeddings."""

import captum.attr as captum
import pytest
import tdhook.attribution as tdhook
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import DimsConfig, GradCAM, GuidedBackpropagation, IntegratedGradients, Saliency
from tests.attribution.models import LABELS, attribute, cnn, inputs, labelled, mlp

MODELS = {"mlp": mlp, "cnn": cnn}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request):
    model = MODELS[request.param]()
    x = inputs(request.param)
    td = TensorDict({"input": x, ("baseline", "input"): torch.zeros_like(x) + 0.1, "label": LABELS}, batch_size=[5])
    return request.param, model, x, td


@pytest.mark.parametrize("absolute", [True, False])
def test_saliency(case, absolute):
    _, model, x, td = case
    ours = attribute(Saliency(init_attr_targets=labelled, additional_init_keys=["label"], absolute=absolute), model, td)
    theirs = captum.Saliency(model).attribute(x, target=LABELS, abs=absolute)
    torch.testing.assert_close(ours["attr", "input"], theirs, **TOLERANCE)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
def test_integrated_gradients(case, method):
    _, model, x, td = case
    ig = IntegratedGradients(
        init_attr_targets=labelled, additional_init_keys=["label"], n_steps=16, method=method,
        multiply_by_inputs=True, compute_convergence_delta=True,
    )
    ours = attribute(ig, model, td)
    theirs, delta = captum.IntegratedGradients(model).attribute(
        x, baselines=td["baseline", "input"], target=LABELS, n_steps=16, method=method, return_convergence_delta=True
    )
    torch.testing.assert_close(ours["attr", "input"], theirs, **TOLERANCE)
    torch.testing.assert_close(ours["convergence_delta"], delta, **TOLERANCE)


def test_grad_cam_on_the_cnn():
    model, x = cnn(), inputs("cnn")
    td = TensorDict(input=x, label=LABELS, batch_size=[5])
    cam = GradCAM({"3": DimsConfig(weight_pooling_dims=(2, 3), feature_sum_dims=(1,))}, init_attr_targets=labelled, additional_init_keys=["label"])
    ours = attribute(cam, model, td)
    theirs = captum.LayerGradCam(model, model[3]).attribute(x, target=LABELS)
    torch.testing.assert_close(ours["attr", "3"], theirs.squeeze(1), **TOLERANCE)


def test_guided_backpropagation(case):
    """captum clamps gradients at ReLUs only: skip every other module class."""
    _, model, x, td = case
    others = tuple({type(m) for m in model.modules() if not isinstance(m, nn.ReLU)})
    gbp = GuidedBackpropagation(init_attr_targets=labelled, additional_init_keys=["label"], classes_to_skip=others)
    ours = attribute(gbp, model, td)
    theirs = captum.GuidedBackprop(model).attribute(x, target=LABELS)
    torch.testing.assert_close(ours["attr", "input"], theirs, **TOLERANCE)


def test_integrated_gradients_on_gpt2_embeddings(samples):
    """As captum and tdhook do it: IG on `inputs_embeds` (token ids cannot be interpolated)."""
    sample = samples("gpt2")
    model = sample.model
    embeds = model.transformer.wte(sample.example["input_ids"]).detach()

    def last_token_logit(outputs, _):
        return TensorDict(logit=outputs["logits"][..., -1, 5], batch_size=outputs.batch_size)

    td = TensorDict({"embeds": embeds, ("baseline", "embeds"): torch.zeros_like(embeds)}, batch_size=[len(embeds)])
    options = {"init_attr_targets": last_token_logit, "n_steps": 8, "multiply_by_inputs": True, "compute_convergence_delta": True}
    ours = attribute(IntegratedGradients(**options), model, td, in_keys={"inputs_embeds": "embeds"}, out_keys=["logits"])
    theirs, delta = captum.IntegratedGradients(lambda e: model(inputs_embeds=e).logits[:, -1, 5]).attribute(
        embeds, baselines=torch.zeros_like(embeds), n_steps=8, return_convergence_delta=True
    )
    torch.testing.assert_close(ours["attr", "embeds"], theirs, **TOLERANCE)
    torch.testing.assert_close(ours["convergence_delta"], delta, **TOLERANCE)
    tdhooks = attribute(tdhook.IntegratedGradients(**options), model, td, in_keys={"inputs_embeds": "embeds"}, out_keys=["logits"])
    torch.testing.assert_close(ours["attr", "embeds"], tdhooks["attr", "embeds"], **TOLERANCE)
