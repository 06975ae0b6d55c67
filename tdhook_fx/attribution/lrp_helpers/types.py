"""Groups of torch.nn layer types, used as `isinstance(module, Linear)` by the composites.

Each group is a class whose `isinstance` / `issubclass` also accept the layer types it lists (and
the members of the groups it lists), as zennit's and tdhook's do; torchvision's
`FrozenBatchNorm2d` counts as batch norm where torchvision imports.
"""

from __future__ import annotations

import importlib.util

from torch import nn


class LayerGroup(type):
    """Metaclass: a class of it is a group; `members` are the types (or groups) it stands for."""

    def __instancecheck__(cls, instance) -> bool:
        return cls.__subclasscheck__(type(instance))

    def __subclasscheck__(cls, subclass) -> bool:
        return type.__subclasscheck__(cls, subclass) or any(issubclass(subclass, member) for member in cls.__dict__.get("members", ()))


def _frozen_batch_norm() -> tuple:
    if importlib.util.find_spec("torchvision") is None:
        return ()
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except Exception:  # noqa: BLE001 - a torchvision that does not load with this torch: no such layer
        return ()
    return (FrozenBatchNorm2d,)


class ConvolutionTranspose(metaclass=LayerGroup):
    members = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ConvolutionStandard(metaclass=LayerGroup):
    members = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Convolution(metaclass=LayerGroup):
    members = (ConvolutionStandard, ConvolutionTranspose)


class Linear(metaclass=LayerGroup):
    """Linear layers in the wide sense: nn.Linear and every convolution."""

    members = (Convolution, nn.Linear)


class BatchNorm(metaclass=LayerGroup):
    members = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *_frozen_batch_norm())


class AvgPool(metaclass=LayerGroup):
    members = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class MaxPool(metaclass=LayerGroup):
    members = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class Activation(metaclass=LayerGroup):
    members = (
        nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid, nn.PReLU,
        nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Softshrink,
        nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold,
    )
