"""tdhook's import path `tdhook.attribution.gradient_helpers`: the gradient attribution base and
the integration helpers (`helpers`: where IntegratedGradients evaluates the gradient)."""

from tdhook_fx.attribution.gradients import GradientAttribution

__all__ = ["GradientAttribution"]
