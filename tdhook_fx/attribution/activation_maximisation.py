"""Activation maximisation (Mahendran & Vedaldi 2015): gradient ascent on the input.

The program saves the maximised modules' outputs and stops right after the last of them, so
each of the `n_steps` forward and backward passes computes the model only that far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase

from tdhook_fx.attribution.gradients import GradientAttribution
from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.execution import ExecutionSpec, GradientMode


class ActivationMaximisation(GradientAttribution):
    """tdhook's `ActivationMaximisation`: `(attr, key)` is the input after `n_steps` steps of
    `x <- clamp(x + alpha * d targets / d x, min_value, max_value)`, the targets being the
    outputs of `modules_to_maximise` (keyed by path) through `init_attr_targets`."""

    def __init__(
        self,
        modules_to_maximise: list[str],
        alpha: float = 0.1,
        n_steps: int = 10,
        min_value: float = -float("inf"),
        max_value: float = float("inf"),
        init_attr_targets: Callable | None = None,
        init_attr_grads: Callable | None = None,
        additional_init_keys: list | None = None,
        attribution_key="attr",
        clean_intermediate_keys: bool = True,
    ):
        super().__init__(
            use_inputs=True,
            use_outputs=False,
            target_modules=modules_to_maximise,
            init_attr_targets=init_attr_targets,
            init_attr_grads=init_attr_grads,
            additional_init_keys=additional_init_keys,
            attribution_key=attribution_key,
        )
        self._keep_working = not clean_intermediate_keys
        self._alpha = alpha
        self._n_steps = n_steps
        self._min_value = min_value
        self._max_value = max_value

    @property
    def execution_spec(self) -> ExecutionSpec:
        """tdhook's: one pass per step, with gradients."""
        return ExecutionSpec(model_passes=self._n_steps, gradient_mode=GradientMode.REQUIRED)

    def forward(self, hooked, td: TensorDictBase) -> TensorDictBase:
        working = td.select(*hooked.interface.in_keys, *self._additional_init_keys).clone(recurse=False)
        step = {}
        for _ in range(self._n_steps):
            step = self.attributions(hooked, working)
            for key in hooked.interface.in_keys:
                moved = working.get(key) + self._alpha * step[key]
                working.set(key, torch.clamp(moved, min=self._min_value, max=self._max_value))
        for key in hooked.interface.in_keys:
            td.set(join_keys(self._attr_key, key), working.get(key))
            if self._keep_working and step:  # tdhook's intermediate keys
                td.set(join_keys("_working", key), working.get(key))
                td.set(join_keys(("_working", "_grad"), key), step[key])
        return td

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        return grads

    def hooked_keys(self, interface) -> tuple[list, list]:
        return list(interface.in_keys), [join_keys(self._attr_key, k) for k in interface.in_keys]

