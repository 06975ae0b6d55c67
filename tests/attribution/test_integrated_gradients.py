"""IntegratedGradients beyond parity: completeness, batch layouts, several inputs and targets, errors."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import IntegratedGradients
from tdhook_fx.attribution.quadrature import quadrature
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
    assert seen == [(4, 7), (4,), (4,)]  # the path, then F(baseline) and F(input)


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
    assert calls == [(4, 12), (4,), (4,)]  # one pass along the path for the three targets
    for c in range(3):

        def single(outputs, _, c=c):
            return TensorDict(t=outputs["output"][..., c], batch_size=outputs.batch_size)

        alone = attribute(IntegratedGradients(init_attr_targets=single, **kwargs), smooth, with_baseline(x))
        torch.testing.assert_close(together["attr", f"c{c}", "input"], alone["attr", "input"])
        torch.testing.assert_close(together["convergence_delta", f"c{c}"], alone["convergence_delta"])
