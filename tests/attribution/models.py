"""Small models and inputs for the attribution tests (captum needs out-of-place ReLUs)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).eval()


def cnn() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4),
    ).eval()


def inputs(model_name: str, batch: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(12)
    shape = (batch, 6) if model_name == "mlp" else (batch, 3, 8, 8)
    return torch.randn(shape, generator=generator)


LABELS = torch.tensor([0, 3, 1, 2, 3])


def labelled(outputs: TensorDict, additional: TensorDict) -> TensorDict:
    """The output at each example's label, for any extra batch dims (IG's steps)."""
    label = additional["label"].reshape(-1, *[1] * (outputs.batch_dims - 1)).expand(outputs.batch_size)
    value = outputs["output"].gather(-1, label.unsqueeze(-1)).squeeze(-1)
    return TensorDict(target=value, batch_size=outputs.batch_size)


def first_output(outputs: TensorDict, _additional) -> TensorDict:
    return TensorDict(target=outputs["output"][..., 0], batch_size=outputs.batch_size)


def attribute(method, model, td: TensorDict, **prepare) -> TensorDict:
    with method.prepare(model, **prepare) as hooked:
        return hooked(td.clone())
