"""Saliency: the gradient of the targets (Simonyan et al. 2013), or gradient x input."""

from __future__ import annotations

from tdhook_fx.attribution.gradients import GradientAttribution


class Saliency(GradientAttribution):
    """tdhook's `Saliency`: `(attr, key)` = d targets / d input (or module output).

    `absolute`: its absolute value; `multiply_by_inputs`: times the input (gradient x input,
    Shrikumar et al. 2016). The other parameters are `GradientAttribution`'s.
    """

    def __init__(self, *args, absolute: bool = False, multiply_by_inputs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._absolute = absolute
        self._multiply_by_inputs = multiply_by_inputs

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        attributions = {}
        for key, grad in grads.items():
            attribution = grad.abs() if self._absolute else grad
            attributions[key] = attribution * values[key] if self._multiply_by_inputs else attribution
        return attributions
