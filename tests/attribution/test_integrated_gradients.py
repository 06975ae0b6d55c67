"""IntegratedGradients beyond parity: completeness, batch layouts, several inputs and targets, errors."""

import captum.attr as captum
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import IntegratedGradients
from tdhook_fx.attribution.quadrature import quadrature
from tdhook_fx.errors import InvalidArgument
from tests.attribution.models import attribute, first_output


@pytest.fixture(scope="module")
def smooth():
    torch.manual_seed(20)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).eval()


def with_baseline(x, baseline=None):
    td = TensorDict({"input": x}, batch_size=x.shape[:1])
    td["baseline", "input"] = torch.zeros_like(x) if baseline is None else baseline
    return td


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_completeness_attributions_sum_to_the_output_change(smooth, method):
    x = torch.randn(6, 5)
    baseline = torch.randn(6, 5) * 0.2
    ig = IntegratedGradients(init_attr_targets=first_output, n_steps=64, method=method, multiply_by_inputs=True, compute_convergence_delta=True)
    td = attribute(ig, smooth, with_baseline(x, baseline))
    change = smooth(x)[:, 0] - smooth(baseline)[:, 0]
    total = td["attr", "input"].sum(-1)
    torch.testing.assert_close(total - change, td["convergence_delta"], rtol=0, atol=1e-6)
    # the quadrature converged (captum's trapezoid weights sum to (n-1)/n: a bias of order 1/n)
    assert td["convergence_delta"].abs().max() < (2e-2 if method == "riemann_trapezoid" else 1e-3)


def test_the_integral_alone_is_the_default(smooth):
    x = torch.randn(3, 5)
    td = with_baseline(x)
    plain = attribute(IntegratedGradients(init_attr_targets=first_output, n_steps=20), smooth, td)
    scaled = attribute(IntegratedGradients(init_attr_targets=first_output, n_steps=20, multiply_by_inputs=True), smooth, td)
    torch.testing.assert_close(plain["attr", "input"] * x, scaled["attr", "input"])


def test_several_targets_are_attributed_as_their_sum_in_one_pass(smooth):
    x = torch.randn(4, 5)

    def two(outputs, _):
        return TensorDict(a=outputs["output"][..., 0], b=outputs["output"][..., 2], batch_size=outputs.batch_size)

    def summed(outputs, _):
        return TensorDict(s=outputs["output"][..., 0] + outputs["output"][..., 2], batch_size=outputs.batch_size)

    kwargs = {"n_steps": 12, "multiply_by_inputs": True, "compute_convergence_delta": True}
    both = attribute(IntegratedGradients(init_attr_targets=two, **kwargs), smooth, with_baseline(x))
    one = attribute(IntegratedGradients(init_attr_targets=summed, **kwargs), smooth, with_baseline(x))
    torch.testing.assert_close(both["attr", "input"], one["attr", "input"])
    torch.testing.assert_close(both["convergence_delta"], one["convergence_delta"])


def test_targets_see_the_steps_as_a_batch_dim(smooth):
    seen = []

    def target(outputs, _):
        seen.append(tuple(outputs.batch_size))
        return first_output(outputs, _)

    attribute(IntegratedGradients(init_attr_targets=target, n_steps=7, compute_convergence_delta=True), smooth, with_baseline(torch.randn(4, 5)))
    assert seen == [(4, 7), (4, 7), (4, 7)]  # the path, then F(baseline) and F(input) in the path's layout


def test_two_batch_dims_equal_one(smooth):
    x = torch.randn(2, 3, 5)
    td = TensorDict({"input": x, ("baseline", "input"): torch.zeros_like(x)}, batch_size=[2, 3])
    ig = IntegratedGradients(init_attr_targets=first_output, n_steps=10, multiply_by_inputs=True, compute_convergence_delta=True)
    nested = attribute(ig, smooth, td)
    flat = attribute(ig, smooth, with_baseline(x.reshape(6, 5)))
    torch.testing.assert_close(nested["attr", "input"].reshape(6, 5), flat["attr", "input"])
    torch.testing.assert_close(nested["convergence_delta"].reshape(6), flat["convergence_delta"])


def test_init_attr_inputs_keeps_the_other_inputs_fixed():
    torch.manual_seed(21)
    first, second = nn.Linear(3, 2), nn.Linear(4, 2)

    class Two(nn.Module):
        def forward(self, a, b):
            return torch.tanh(first(a)) * second(b)

    a, b = torch.randn(5, 3), torch.randn(5, 4)
    td = TensorDict({"a": a, "b": b, ("baseline", "a"): torch.zeros(5, 3)}, batch_size=[5])
    ig = IntegratedGradients(
        init_attr_targets=first_output, init_attr_inputs=lambda inputs, _: inputs.select("a"), n_steps=40,
        multiply_by_inputs=True, compute_convergence_delta=True,
    )
    result = attribute(ig, Two(), td, in_keys=["a", "b"])
    assert ("attr", "b") not in result.keys(include_nested=True)
    change = Two()(a, b)[:, 0] - Two()(torch.zeros(5, 3), b)[:, 0]
    torch.testing.assert_close(result["attr", "a"].sum(-1), change, rtol=0, atol=1e-3)


def test_latent_integrated_gradients_over_a_module(smooth):
    """input_modules: the path integral of the gradient at a module's output (tdhook's layout)."""
    x = torch.randn(3, 5)
    result = attribute(IntegratedGradients(init_attr_targets=first_output, input_modules=["1"], n_steps=30), smooth, with_baseline(x))
    assert result["attr", "1"].shape == (3, 12)
    # d out0 / d tanh-output is the last layer's weight row, the same at every step
    torch.testing.assert_close(result["attr", "1"], smooth[2].weight[0].expand(3, 12))


def test_quadrature_matches_the_definitions():
    alphas, steps = quadrature("riemann_trapezoid", 5)
    assert alphas == pytest.approx([0, 0.25, 0.5, 0.75, 1]) and steps == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.1])
    alphas, steps = quadrature("gausslegendre", 3)
    assert sum(steps) == pytest.approx(1) and all(0 < a < 1 for a in alphas)
    with pytest.raises(ValueError, match="Invalid integral approximation method name: riemann"):
        quadrature("riemann", 5)
    with pytest.raises(ValueError, match="at least 2"):
        quadrature("riemann_left", 1)


def test_a_missing_baseline_says_where_it_is_read(smooth):
    td = TensorDict({"input": torch.randn(2, 5)}, batch_size=[2])
    with pytest.raises(KeyError, match=r"reads it at \('baseline', 'input'\)"):
        attribute(IntegratedGradients(init_attr_targets=first_output), smooth, td)


def test_token_ids_cannot_be_interpolated(samples):
    sample = samples("tiny_transformer")

    def logit(outputs, _):
        return TensorDict(o=outputs["logits"][..., -1, 0], batch_size=outputs.batch_size)

    td = sample.example.clone()
    td["baseline", "input_ids"] = torch.zeros_like(td["input_ids"])
    ig = IntegratedGradients(init_attr_targets=logit, init_attr_inputs=lambda inputs, _: inputs)
    with pytest.raises(Exception, match="holds int64 values, which have no gradient") as error:
        attribute(ig, sample.model, td, in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert "inputs_embeds" in str(error.value)


def test_per_target_gives_each_target_its_own_attribution_from_one_forward(smooth):
    x = torch.randn(4, 5)
    calls = []

    def three(outputs, _):
        calls.append(tuple(outputs.batch_size))
        o = outputs["output"]
        return TensorDict(c0=o[..., 0], c1=o[..., 1], c2=o[..., 2], batch_size=outputs.batch_size)

    kwargs = {"n_steps": 12, "multiply_by_inputs": True, "compute_convergence_delta": True}
    together = attribute(IntegratedGradients(init_attr_targets=three, per_target=True, **kwargs), smooth, with_baseline(x))
    assert calls == [(4, 12), (4, 12), (4, 12)]  # one pass along the path for the three targets (then the endpoints)
    for c in range(3):

        def single(outputs, _, c=c):
            return TensorDict(t=outputs["output"][..., c], batch_size=outputs.batch_size)

        alone = attribute(IntegratedGradients(init_attr_targets=single, **kwargs), smooth, with_baseline(x))
        torch.testing.assert_close(together["attr", f"c{c}", "input"], alone["attr", "input"])
        torch.testing.assert_close(together["convergence_delta", f"c{c}"], alone["convergence_delta"])


def one_hot_over_the_steps(outputs, additional):
    """A target written for batch (B, n_steps): each example's label mask broadcast over its steps."""
    mask = torch.nn.functional.one_hot(additional["label"], 3)[:, None, :]
    return TensorDict(t=(outputs["output"] * mask).sum(-1), batch_size=outputs.batch_size)


def test_a_target_written_for_the_path_gives_captums_delta(smooth):
    """The endpoints are shown to the target in the path's layout (B, n_steps); shown as (B,),
    this target broadcast (B, 1, C) against (B, C) and the delta came out as -0.5 (silently)."""
    x, labels = torch.randn(2, 5), torch.tensor([2, 0])
    td = with_baseline(x)
    td["label"] = labels
    ig = IntegratedGradients(
        init_attr_targets=one_hot_over_the_steps, additional_init_keys=["label"], n_steps=16,
        multiply_by_inputs=True, compute_convergence_delta=True,
    )
    ours = attribute(ig, smooth, td)
    theirs, delta = captum.IntegratedGradients(smooth).attribute(
        x, baselines=torch.zeros_like(x), target=labels, n_steps=16, return_convergence_delta=True
    )
    torch.testing.assert_close(ours["attr", "input"], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["convergence_delta"], delta, rtol=0, atol=1e-5)


def test_a_target_that_drops_the_steps_is_refused(smooth):
    def per_example(outputs, _):  # written for batch (B,): keeps the last step only
        return TensorDict(t=outputs["output"][:, -1, 0], batch_size=outputs.batch_size[:1])

    with pytest.raises(InvalidArgument, match=r"batch size \[4\]; it was given batch size \[4, 8\]"):
        attribute(IntegratedGradients(init_attr_targets=per_example, n_steps=8), smooth, with_baseline(torch.randn(4, 5)))


def test_a_target_that_mixes_the_steps_has_no_delta(smooth):
    def centred(outputs, _):  # the output minus its mean over the path: not a function of one point
        o = outputs["output"][..., 0]
        return TensorDict(t=o - o.mean(-1, keepdim=True) * torch.linspace(0, 1, o.shape[-1]), batch_size=outputs.batch_size)

    ig = IntegratedGradients(init_attr_targets=centred, n_steps=8, compute_convergence_delta=True)
    with pytest.raises(InvalidArgument, match="mixes the n_steps points"):
        attribute(ig, smooth, with_baseline(torch.randn(4, 5)))


def test_an_input_may_also_be_an_additional_key():
    """An attention-style mask is passed once: the model reads it, and so does the target."""
    torch.manual_seed(22)
    layer = nn.Linear(4, 4)

    class Masked(nn.Module):
        def forward(self, x, mask):
            return (torch.tanh(layer(x)) * mask.unsqueeze(-1)).sum(-1)

    x, mask = torch.randn(3, 6, 4), (torch.rand(3, 6) > 0.3).float()
    td = TensorDict({"x": x, "mask": mask, ("baseline", "x"): torch.zeros_like(x)}, batch_size=[3])
    seen = []

    def masked_mean(outputs, additional):
        seen.append(tuple(additional["mask"].shape))
        return TensorDict(t=outputs["output"].sum(-1) / additional["mask"].sum(-1, keepdim=True), batch_size=outputs.batch_size)

    ig = IntegratedGradients(
        init_attr_targets=masked_mean, init_attr_inputs=lambda inputs, _: inputs.select("x"), additional_init_keys=["mask"],
        n_steps=24, multiply_by_inputs=True, compute_convergence_delta=True,
    )
    result = attribute(ig, Masked(), td, in_keys=["x", "mask"])
    assert seen == [(3, 6)] * 3
    change = (Masked()(x, mask) - Masked()(torch.zeros_like(x), mask)).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(result["attr", "x"].sum((1, 2)), change, rtol=0, atol=1e-4)
    assert result["convergence_delta"].abs().max() < 1e-4


@given(
    batch=st.integers(1, 5), n_steps=st.integers(2, 12), seed=st.integers(0, 2**16),
    method=st.sampled_from(["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]),
    layout=st.sampled_from(["one-hot over the steps", "gather per step", "index"]),
)
def test_the_delta_equals_captums_for_targets_written_for_the_path(smooth, batch, n_steps, seed, method, layout):
    generator = torch.Generator().manual_seed(seed)
    x, baseline = torch.randn(batch, 5, generator=generator), torch.randn(batch, 5, generator=generator) * 0.3
    labels = torch.randint(0, 3, (batch,), generator=generator)

    def target(outputs, additional):
        o, label = outputs["output"], additional["label"]
        if layout == "one-hot over the steps":
            return one_hot_over_the_steps(outputs, additional)
        if layout == "gather per step":
            index = label.view(-1, 1, 1).expand(*outputs.batch_size, 1)
            return TensorDict(t=o.gather(-1, index).squeeze(-1), batch_size=outputs.batch_size)
        return TensorDict(t=o[torch.arange(len(label)), ..., label], batch_size=outputs.batch_size)

    td = with_baseline(x, baseline)
    td["label"] = labels
    ig = IntegratedGradients(
        init_attr_targets=target, additional_init_keys=["label"], n_steps=n_steps, method=method,
        multiply_by_inputs=True, compute_convergence_delta=True,
    )
    ours = attribute(ig, smooth, td)
    theirs, delta = captum.IntegratedGradients(smooth).attribute(
        x, baselines=baseline, target=labels, n_steps=n_steps, method=method, return_convergence_delta=True
    )
    torch.testing.assert_close(ours["attr", "input"], theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["convergence_delta"], delta, rtol=0, atol=1e-5)
