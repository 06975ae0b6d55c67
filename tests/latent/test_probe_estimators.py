"""The torch probe estimators train to the same probes as tdhook 0.3.0's from the same seed."""

import pytest
import tdhook.latent.probing.estimators as theirs
import torch

import tdhook_fx.latent.probing.estimators as ours
from tdhook_fx.errors import InvalidArgument

GENERATOR = torch.Generator().manual_seed(1)
H1, H2 = torch.randn(300, 6, generator=GENERATOR), torch.randn(300, 5, generator=GENERATOR)
CLASSES = (H1[:, 0] * H2[:, 1] > 0).long()
PRODUCT = H1[:, :1] * H2[:, 1:2]

CASES = {
    "linear classifier": ("LinearEstimator", (6,), {"num_classes": 2, "epochs": 6, "batch_size": 64}, (H1,), CLASSES),
    "linear regression": ("LinearEstimator", (6,), {"epochs": 4, "lr": 1e-2, "bias": False}, (H1,), H1[:, :1] * 2),
    "bilinear classifier": ("BilinearEstimator", (6, 5), {"num_classes": 2, "epochs": 2, "batch_size": 64}, (H1, H2), CLASSES),
    "low-rank regression": ("LowRankBilinearEstimator", (6, 5), {"epochs": 5, "batch_size": 32, "lr": 1e-2}, (H1, H2), PRODUCT),
    "low-rank without bias": ("LowRankBilinearEstimator", (6, 5), {"num_classes": 3, "epochs": 2, "bias": False}, (H1, H2), CLASSES),
}


def trained(module, name, args, options, inputs, target):
    torch.manual_seed(3)
    return getattr(module, name)(*args, **options).fit(*inputs, y=target)


@pytest.mark.parametrize("case", CASES)
def test_same_probe_as_tdhook(case):
    inputs = CASES[case][3]
    mine, reference = trained(ours, *CASES[case]), trained(theirs, *CASES[case])
    assert list(mine.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, rtol=0, atol=0)
    assert torch.equal(mine.predict(*inputs), reference.predict(*inputs))


def test_the_bilinear_probe_learns_a_product():
    torch.manual_seed(0)
    probe = ours.BilinearEstimator(6, 5, epochs=30, lr=5e-2, batch_size=300).fit(H1, H2, y=PRODUCT)
    assert torch.nn.functional.mse_loss(probe.predict(H1, H2), PRODUCT) < 0.05 * PRODUCT.var()


def test_fit_inside_inference_mode():
    probe = ours.LinearEstimator(6, num_classes=2, epochs=2)
    with torch.inference_mode():
        inputs, labels = H1.clone(), CLASSES.clone()
        probe.fit(inputs, y=labels)
    assert probe.linear.weight.grad is not None


def test_errors():
    with pytest.raises(InvalidArgument, match="does not match target shape"):
        ours.LinearEstimator(6, epochs=1).fit(H1, y=CLASSES.float())
    with pytest.raises(InvalidArgument, match="expects 1 input tensor, got 2"):
        ours.LinearEstimator(6)(H1, H1)
    with torch.inference_mode():
        frozen = ours.LinearEstimator(6)
    with pytest.raises(RuntimeError, match="constructed outside torch.inference_mode"):
        frozen.fit(H1, y=H1[:, :1])
