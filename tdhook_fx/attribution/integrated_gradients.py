"""Integrated gradients (Sundararajan et al. 2017), in one batched forward and backward.

The `n_steps` points between the baseline and the input are stacked along a new batch
dimension (tdhook's layout: batch `(*batch, n_steps)`, flattened for the model), so the
compiled graph runs once on all of them and one `autograd.grad` gives every step's gradient.
"""

from __future__ import annotations

import torch

from tdhook_fx.attribution.gradients import GradientAttribution, _flatten
from tdhook_fx.attribution.quadrature import quadrature
from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.errors import InvalidArgument, MissingInputKey
from tdhook_fx.execution import ExecutionSpec, GradientMode


class IntegratedGradients(GradientAttribution):
    """tdhook's `IntegratedGradients`.

    - `method`: "gausslegendre" (default), "riemann_left", "riemann_right", "riemann_middle"
      or "riemann_trapezoid"; `n_steps` points.
    - The baseline of input `key` is read at `(baseline_key, key)` (same shape as the input).
    - `(attr, key)` is the path integral of the gradient; `multiply_by_inputs=True` multiplies
      it by `input - baseline` (the usual IG attribution, whose sum approximates
      f(input) - f(baseline)).
    - `compute_convergence_delta`: writes `convergence_delta` = sum of the attributions minus
      (F(input) - F(baseline)), F being the targets summed (one more forward pass, on the
      inputs and the baselines together, without gradients). `init_attr_targets` sees batch
      `(*batch, n_steps)` in both passes (tdhook gives the endpoints `(*batch,)`, which turns a
      target written for the path silently wrong).
    - Several targets (several keys from `init_attr_targets`) are attributed together, as
      their sum, in the same single pass (tdhook's semantics); with `per_target=True` each gets
      its own attribution `(attr, target, key)` (and `("convergence_delta", target)`), still
      from one forward pass.
    """

    def __init__(
        self,
        *args,
        compute_convergence_delta: bool = False,
        baseline_key="baseline",
        multiply_by_inputs: bool = False,
        method: str = "gausslegendre",
        n_steps: int = 50,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._compute_convergence_delta = compute_convergence_delta
        self._baseline_key = baseline_key
        self._multiply_by_inputs = multiply_by_inputs
        self._n_steps = n_steps
        alphas, step_sizes = quadrature(method, n_steps)
        self._alphas = torch.tensor(alphas, dtype=torch.float64)  # cast per input: the same rounding as from floats
        self._step_sizes = torch.tensor(step_sizes, dtype=torch.float64)

    @property
    def execution_spec(self) -> ExecutionSpec:
        """tdhook's count: the convergence delta costs two more passes there (one here)."""
        passes = 3 if self._compute_convergence_delta else 1
        return ExecutionSpec(model_passes=passes, gradient_mode=GradientMode.REQUIRED)

    def hooked_keys(self, interface) -> tuple[list, list]:
        in_keys, out_keys = super().hooked_keys(interface)
        return in_keys, out_keys + (["convergence_delta"] if self._compute_convergence_delta else [])

    def model_inputs(self, td, inputs: dict, attributed: list, batch: tuple) -> tuple[dict, tuple]:
        n, nb = self._n_steps, len(batch)
        shape = (*batch, n)
        call_inputs = {}
        for key, x in inputs.items():
            feature = x.shape[nb:]
            if key in attributed:
                baseline = self._baseline(td, key, x)
                alphas = self._alphas.to(dtype=x.dtype, device=x.device).view(*(1,) * nb, n, *(1,) * len(feature))
                points = torch.addcmul(baseline.unsqueeze(nb), (x - baseline).unsqueeze(nb), alphas)
            else:
                points = x.unsqueeze(nb).expand(*batch, n, *feature)
            call_inputs[key] = points.reshape(-1, *feature)
        return call_inputs, shape

    def reduce_grads(self, grads: dict, batch: tuple) -> dict:
        nb = len(batch)
        reduced = {}
        for key, grad in grads.items():
            steps = self._step_sizes.to(dtype=grad.dtype, device=grad.device)
            reduced[key] = torch.tensordot(grad.movedim(nb, -1), steps, dims=1)
        return reduced

    def _grad_attr(self, grads: dict, values: dict) -> dict:
        return grads

    def finish(self, hooked, td, attributions: dict, call_inputs, attributed, batch, additional) -> dict:
        nb = len(batch)
        if self._multiply_by_inputs:
            for found in attributions.values():
                for key in attributed:
                    x = td.get(key)
                    found[key] = found[key] * (x - self._baseline(td, key, x))
        if self._compute_convergence_delta:
            start, end = self._target_sums(hooked, td, attributed, batch, additional)
            for target, found in attributions.items():
                total = sum(_feature_sum(found[k], nb) for k in found)
                names = list(start) if target is None else [target]
                change = sum(end[name] - start[name] for name in names)
                td.set("convergence_delta" if target is None else join_keys("convergence_delta", target), total - change)
        return attributions

    def _target_sums(self, hooked, td, attributed, batch, additional) -> list[dict]:
        """[F(baseline), F(input)] per target (summed over its features), from one forward pass
        on both (no gradients).

        `init_attr_targets` sees the endpoints in the layout it saw along the path, batch
        `(*batch, n_steps)` (each endpoint repeated at every step, a view), so a target written
        for that layout (labels broadcast over the steps, `n_steps` spelled out) means the same
        thing in both passes; one step of its result is kept, after checking that the steps agree.
        """
        interface = hooked.interface
        nb, n = len(batch), self._n_steps
        both = []
        for key in interface.in_keys:
            x = td.get(key)
            start = self._baseline(td, key, x) if key in attributed else x
            both.append(torch.cat([_flatten(start, nb), _flatten(x, nb)]) if nb else torch.stack([start, x]))
        with torch.no_grad():
            program, result = self.run_program(hooked, tuple(both))
        outputs, saved = list((result.outputs or {}).values()), result.saved
        sums = []
        for half in range(2):

            def along_path(value: torch.Tensor, half=half) -> torch.Tensor:
                value = value.chunk(2)[half] if nb else value[half]
                value = value.reshape(*batch, *value.shape[1 if nb else 0 :])
                return value.unsqueeze(nb).expand(*batch, n, *value.shape[nb:])

            values = self._target_values(interface, program, outputs, saved, along_path)
            targets = self._select_targets(values, (*batch, n), additional)
            sums.append({k: _feature_sum(_one_step(targets.get(k), k, nb), nb) for k in targets.keys(True, True)})
        return sums

    def _baseline(self, td, key, like: torch.Tensor) -> torch.Tensor:
        where = join_keys(self._baseline_key, key)
        baseline = td.get(where, None)
        if baseline is None:
            raise MissingInputKey(
                f"no baseline for the input {key!r}: IntegratedGradients reads it at {where!r}\n"
                f"  hint: td[{where!r}] = torch.zeros_like(td[{key!r}])"
            )
        if baseline.shape != like.shape:
            raise InvalidArgument(f"the baseline at {where!r} has shape {tuple(baseline.shape)}; the input has {tuple(like.shape)}")
        return baseline


def _labelled(outputs, additional, selected_out_keys, label_key="label"):
    """tdhook's `IntegratedGradients.init_attr_targets_with_labels`: each selected output at the
    example's label (use with functools.partial). The labels are a tensor of the TensorDict's
    batch shape, or (as tdhook requires) a TensorDict of them keyed like the outputs."""
    from tensordict import TensorDict, TensorDictBase

    targets = outputs.select(*selected_out_keys)
    given = additional[label_key]
    found = {}
    for key in targets.keys(True, True):
        labels = given[key] if isinstance(given, TensorDictBase) else given
        labels = labels.reshape(*labels.shape, *[1] * (targets.batch_dims - labels.dim())).expand(targets.batch_size)
        value = targets[key]
        if value.shape[:-1] != targets.batch_size:
            raise InvalidArgument(
                f"output {key!r} has shape {tuple(value.shape)}: labels select along its last dim, "
                f"which must follow the batch dims {list(targets.batch_size)}"
            )
        found[key] = value.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
    return TensorDict(found, batch_size=targets.batch_size)


IntegratedGradients.init_attr_targets_with_labels = staticmethod(_labelled)


def _one_step(value: torch.Tensor, key, batch_dims: int) -> torch.Tensor:
    """The target at the first of `n_steps` identical points; refused where the steps disagree
    (a target that mixes the steps, e.g. normalises over them, has no convergence delta)."""
    first = value.select(batch_dims, 0)
    scale = first.abs().max() if first.numel() else 0
    if not torch.allclose(value, first.unsqueeze(batch_dims).expand_as(value), rtol=1e-5, atol=1e-6 * float(scale), equal_nan=True):
        raise InvalidArgument(
            f"init_attr_targets gives the target {key!r} different values at identical points of the path: "
            f"it mixes the n_steps points (batch dim {batch_dims}), so the convergence delta is undefined\n"
            "  hint: compute each target from its own point only, e.g. outputs['output'][..., label]"
        )
    return first


def _feature_sum(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    dims = tuple(range(batch_dims, x.dim()))
    return x.sum(dim=dims) if dims else x
