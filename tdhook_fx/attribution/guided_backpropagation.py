"""Guided backpropagation (Springenberg et al. 2014): only positive gradients flow back.

Compiled as one `set grad M:in.X = $relu(value)` per tensor input of every submodule M of the
model (tdhook clamps each module's `grad_input` with a backward hook), so the printed program
lists exactly where the gradient is clamped.
"""

from __future__ import annotations

import torch
from torch import nn

from tdhook_fx.attribution.gradients import GradientAttribution
from tdhook_fx.methods.reads import dsl_site
from tdhook_fx.syntax import ast


class GuidedBackpropagation(GradientAttribution):
    """tdhook's `GuidedBackpropagation`: gradients clamped at zero at every submodule's inputs.

    `classes_to_skip`: module classes whose inputs are left alone (e.g. everything but
    `nn.ReLU`, which gives captum's variant). `multiply_by_inputs`: times the input.
    Unlike a backward hook, the clamp also applies to inputs a module takes by keyword.
    """

    def __init__(self, *args, multiply_by_inputs: bool = False, classes_to_skip: tuple[type[nn.Module], ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self._multiply_by_inputs = multiply_by_inputs
        self._classes_to_skip = tuple(classes_to_skip)

    def add_statements(self, hooked, table, builder) -> None:
        modules = dict(hooked.interface.model.named_modules())
        relu = None
        for site in table:
            if site.kind != "in" or not site.eager or not site.dtype.is_floating_point:
                continue
            if not site.module or isinstance(modules[site.module], self._classes_to_skip):
                continue
            relu = relu or builder.var("relu", torch.relu)
            builder.add(ast.Set(dsl_site(table, site), ast.Call(relu, (ast.SiteValue(),)), grad=True))

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        if not self._multiply_by_inputs:
            return grads
        return {key: grad * values[key] for key, grad in grads.items()}
