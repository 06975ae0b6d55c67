"""Checks of an attribution before trusting it: infidelity and sensitivity (tdhook's `tdhook.metrics`).

Both are called as `metric(hooked, td)`, `hooked` being a prepared attribution module and `td`
the TensorDict it has already attributed; they return one value per example and model input:

- **Infidelity** (Yeh et al. 2019): how badly the attribution predicts the output change under
  small random perturbations I of an input: mean over perturbations of
  (sum(attr * I) - sum(f(x) - f(x - I)))^2. Near 0 for a faithful attribution (exactly 0 for
  the gradient of a linear model).
- **Sensitivity**: how much the attribution changes when every input moves a little
  (uniform noise in [-r, r]): mean |attr - attr'| / mean |attr|. An explanation that jumps under
  noise the model barely notices is not one to trust.

The perturbations and formulas are tdhook 0.3.0's (same random draws in the same order, so the
same seed gives the same numbers). With a tdhook_fx attribution module, the outputs that
infidelity needs cost a forward pass each (`hooked.outputs`), not a whole attribution; the
attribution need not be prepared with `clean_intermediate_keys=False`; and for
IntegratedGradients they are the outputs at the inputs (tdhook reads the outputs along the
integration path there, which infidelity was not meant for).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MissingInputKey


class InfidelityMetric:
    """`n_perturb_samples` Gaussian perturbations (std 0.01) of each floating-point input in turn."""

    def __init__(self, n_perturb_samples: int = 10, *, attribution_key="attr", output_key=("_mod_out", "output")):
        if not isinstance(n_perturb_samples, int) or isinstance(n_perturb_samples, bool):
            raise InvalidArgumentType("n_perturb_samples must be an int")
        if n_perturb_samples <= 0:
            raise InvalidArgument("n_perturb_samples must be positive")
        self.n_perturb_samples = n_perturb_samples
        self.attribution_key = attribution_key
        self.output_key = output_key

    def additional_model_passes(self, module) -> int:
        """How many times `__call__` runs `module`."""
        return self.n_perturb_samples * len(module.in_keys)

    def __call__(self, module, original_data: TensorDictBase) -> TensorDict:
        if hasattr(module, "outputs"):  # a tdhook_fx module: the outputs at the inputs, by a forward pass
            original_output = _tensor(module.outputs(original_data), self.output_key, "Model output")
        else:  # tdhook's: written by the attribution call (clean_intermediate_keys=False)
            original_output = _tensor(original_data, self.output_key, "Model output")
        results = TensorDict(batch_size=original_data.batch_size, device=original_data.device)
        batch_dims = original_data.ndim
        for key in module.in_keys:
            original_input = _tensor(original_data, key, "Model input")
            attribution = _tensor(original_data, join_keys(self.attribution_key, key), "attribution")
            scores, changes = [], []
            for _ in range(self.n_perturb_samples):
                perturbed = _perturbed(original_data, [key], lambda v: v + torch.randn_like(v) * 0.01)
                perturbed_output = _tensor(_outputs(module, perturbed), self.output_key, "perturbed model output")
                perturbation = original_input - _tensor(perturbed, key, "perturbed model input")
                scores.append(_feature_reduce(attribution * perturbation, batch_dims))
                changes.append(_feature_reduce(original_output - perturbed_output, batch_dims))
            results.set(key, ((torch.stack(scores, -1) - torch.stack(changes, -1)) ** 2).mean(dim=-1))
        return results


class SensitivityMetric:
    """One uniform perturbation in [-perturb_radius, perturb_radius] of every input, re-attributed."""

    def __init__(self, perturb_radius: float = 0.02, *, attribution_key="attr"):
        if perturb_radius < 0:
            raise InvalidArgument("perturb_radius must be non-negative")
        self.perturb_radius = perturb_radius
        self.attribution_key = attribution_key

    def additional_model_passes(self, module) -> int:
        return 1

    def __call__(self, module, original_data: TensorDictBase) -> TensorDict:
        radius = self.perturb_radius
        perturbed = _perturbed(original_data, module.in_keys, lambda v: v + torch.empty_like(v).uniform_(-radius, radius))
        perturbed_result = module(perturbed)
        results = TensorDict(batch_size=original_data.batch_size, device=original_data.device)
        batch_dims = original_data.ndim
        for key in module.in_keys:
            attr_key = join_keys(self.attribution_key, key)
            original = _tensor(original_data, attr_key, "attribution")
            moved = _tensor(perturbed_result, attr_key, "perturbed attribution")
            magnitude = _feature_reduce(original.abs(), batch_dims, mean=True)
            difference = _feature_reduce((original - moved).abs(), batch_dims, mean=True)
            results.set(key, torch.where(magnitude == 0, difference, difference / magnitude))
        return results


def _outputs(module, data: TensorDictBase) -> TensorDictBase:
    """The module's outputs on `data`: a forward pass for tdhook_fx modules, a full call otherwise."""
    if hasattr(module, "outputs"):
        return module.outputs(data)
    return module(data)


@torch.no_grad()
def _perturbed(data: TensorDictBase, keys, perturb) -> TensorDictBase:
    copy = data.clone()
    for key in keys:
        value = _tensor(copy, key, "Model input")
        if not value.is_floating_point():
            raise InvalidArgumentType(f"Model input at key {key!r} must be floating point")
        copy.set(key, perturb(value))
    return copy


def _feature_reduce(value: torch.Tensor, batch_dims: int, *, mean: bool = False) -> torch.Tensor:
    dims = tuple(range(batch_dims, value.ndim))
    if not dims:
        return value
    return value.mean(dim=dims) if mean else value.sum(dim=dims)


def _tensor(data: TensorDictBase, key, role: str) -> torch.Tensor:
    value = data.get(key, None)
    if not isinstance(value, torch.Tensor):
        hint = (
            "\n  hint: prepare the attribution with clean_intermediate_keys=False, or pass output_key= naming the output"
            if role == "Model output"
            else ""
        )
        raise MissingInputKey(f"{role} tensor is missing at key {key!r}{hint}")
    return value


__all__ = ["InfidelityMetric", "SensitivityMetric"]
