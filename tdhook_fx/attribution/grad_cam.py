"""Grad-CAM (Selvaraju et al. 2016): a module's activations weighted by their pooled gradients."""

from __future__ import annotations

from dataclasses import dataclass

from tdhook_fx.attribution.gradients import GradientAttribution


@dataclass
class DimsConfig:
    """Which dims of a module's activation (batch dim included) to pool the gradient over
    (`weight_pooling_dims`, e.g. the spatial dims (2, 3)) and to sum the weighted activation
    over (`feature_sum_dims`, e.g. the channels (1,)); None: do not pool / sum."""

    weight_pooling_dims: tuple[int, ...] | None = None
    feature_sum_dims: tuple[int, ...] | None = None


class GradCAM(GradientAttribution):
    """tdhook's `GradCAM`: `(attr, path)` for each module of `modules_to_attribute` {path: DimsConfig}.

    attr = sum over feature_sum_dims of (mean over weight_pooling_dims of d targets / d act) * act.
    No ReLU is applied (as in tdhook; captum's `relu_attributions=False`). `absolute` takes the
    gradient's absolute value first.
    """

    def __init__(self, modules_to_attribute: dict[str, DimsConfig] | None, *args, absolute: bool = False, **kwargs):
        kwargs.update(use_inputs=False, use_outputs=True, target_modules=None, init_attr_inputs=None)
        kwargs["input_modules"] = list(modules_to_attribute or {})
        super().__init__(*args, **kwargs)
        self._modules_to_attribute = dict(modules_to_attribute or {})
        self._absolute = absolute

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        attributions = {}
        for key, grad in grads.items():
            config = self._modules_to_attribute[key]
            grad = grad.abs() if self._absolute else grad
            pooled = grad.mean(dim=config.weight_pooling_dims, keepdim=True) if config.weight_pooling_dims is not None else grad
            weighted = pooled * values[key]
            attributions[key] = weighted.sum(dim=config.feature_sum_dims) if config.feature_sum_dims is not None else weighted
        return attributions
