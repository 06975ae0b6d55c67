"""Conditioned intrinsic-dimension analysis as TensorDict steps (tdhook.dimension).

cached activations -> `ActivationSamples` (one dataset of points per condition: channel,
position, layer) -> `DimensionEstimation` (any estimator of
`tdhook_fx.latent.dimension_estimation`) -> `DimensionSummary` (count, mean, std of the finite
dimensions). Each step reads and writes stable keys of one artifacts TensorDict; results whose
shape has nothing to do with the model's batch are stored as `NonTensorData` (read `.data`).
`conditioned_dimension_workflow` chains an `ActivationCaching` pass and the three steps:

```python
workflow = conditioned_dimension_workflow(
    ActivationCaching("layer3", cache_key=("activations", "cache")), "layer3",
    channel_conditioned_samples, TwoNnDimensionEstimator(),
)
result = workflow(model, TensorDict(input=x, batch_size=[len(x)]))
result["metrics", "dimension"].data            # one dimension per channel
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.tensorclass import NonTensorData
from tensordict.utils import NestedKey
from torch import nn

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType
from tdhook_fx.latent.activation_caching import ActivationCaching
from tdhook_fx.methods.context import HookingContextFactory


def _is_key(value) -> bool:
    return isinstance(value, str) or (isinstance(value, tuple) and bool(value) and all(isinstance(p, str) for p in value))


def _check_keys(message: str, *keys) -> None:
    if not all(_is_key(key) for key in keys):
        raise InvalidArgumentType(message)


def _store(artifacts: TensorDictBase, key: NestedKey, value) -> None:
    """Store a result whose shape need not follow the artifacts' batch."""
    artifacts.set(key, NonTensorData(value, batch_size=artifacts.batch_size))


def _stored(value):
    return value.data if isinstance(value, NonTensorData) else value


def channel_conditioned_samples(activations: torch.Tensor) -> torch.Tensor:
    """(samples, channels, ...) -> (channels, samples, features): one dataset per channel, the
    trailing dims (e.g. a channel's spatial map) being the features."""
    if activations.ndim < 3:
        raise InvalidArgument(f"Channel-conditioned activations need shape (samples, channels, ...); got {tuple(activations.shape)}")
    return activations.transpose(0, 1).flatten(start_dim=2)


def spatial_conditioned_samples(activations: torch.Tensor) -> torch.Tensor:
    """(samples, channels, height, width) -> (height * width, samples, channels): one dataset per
    location of a 2-d grid (an image, a board), the channels being the features."""
    if activations.ndim != 4:
        raise InvalidArgument(
            f"Spatial-conditioned activations need shape (samples, channels, height, width); got {tuple(activations.shape)}"
        )
    return activations.flatten(start_dim=2).permute(2, 0, 1)


class ActivationSamples(TensorDictModuleBase):
    """Reads the cached activation `activation_key` under `cache_key`, writes `transform(it)`
    ((..., points, features) datasets) at `out_key`."""

    def __init__(
        self,
        activation_key: NestedKey,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        cache_key: NestedKey = ("activations", "cache"),
        out_key: NestedKey = ("activations", "samples"),
    ):
        super().__init__()
        _check_keys("activation_key must be a TensorDict nested key", activation_key)
        _check_keys("cache_key and out_key must be TensorDict nested keys", cache_key, out_key)
        self.activation_key = activation_key
        self.transform = transform
        self.cache_key = cache_key
        self.out_key = out_key
        self.in_keys = [join_keys(cache_key, activation_key)]
        self.out_keys = [out_key]

    def forward(self, artifacts: TensorDictBase) -> TensorDictBase:
        activations = artifacts.get(self.in_keys[0], None)
        if not isinstance(activations, torch.Tensor):
            raise InvalidArgumentType(f"Cached activation {self.activation_key!r} must be a tensor at {self.in_keys[0]!r}")
        samples = self.transform(activations)
        if not isinstance(samples, torch.Tensor):
            raise InvalidArgumentType("Activation sample transform must return a tensor")
        if samples.ndim < 2:
            raise InvalidArgument("Estimator samples must have shape (..., points, features)")
        _store(artifacts, self.out_key, samples)
        return artifacts


class DimensionEstimation(TensorDictModuleBase):
    """Runs `estimator` (reading its own `in_key`, writing its own `out_key`) on the samples at
    `in_key`, and stores its result at `out_key`."""

    def __init__(self, estimator: TensorDictModuleBase, *, in_key: NestedKey = ("activations", "samples"), out_key: NestedKey = ("metrics", "dimension")):
        super().__init__()
        _check_keys(
            "Dimension estimation requires native estimator in_key and out_key attributes",
            getattr(estimator, "in_key", None), getattr(estimator, "out_key", None),
        )
        _check_keys("in_key and out_key must be TensorDict nested keys", in_key, out_key)
        self.estimator = estimator
        self.in_key = in_key
        self.out_key = out_key
        self.estimator_in_key = estimator.in_key
        self.estimator_out_key = estimator.out_key
        self.in_keys = [in_key]
        self.out_keys = [out_key]

    def forward(self, artifacts: TensorDictBase) -> TensorDictBase:
        samples = _stored(artifacts.get(self.in_key, None))
        if not isinstance(samples, torch.Tensor):
            raise InvalidArgumentType(f"Estimator samples at {self.in_key!r} must be a tensor")
        if samples.ndim < 2:
            raise InvalidArgument("Estimator samples must have shape (..., points, features)")
        result = self.estimator(TensorDict({self.estimator_in_key: samples}, batch_size=[]))
        _store(artifacts, self.out_key, result.get(self.estimator_out_key))
        return artifacts


class DimensionSummary(TensorDictModuleBase):
    """Summarises the dimensions at `in_key` over `dims` (all by default): a TensorDict of the
    finite values' `count`, `mean` and (population) `std`, NaN where none is finite."""

    def __init__(self, *, in_key: NestedKey = ("metrics", "dimension"), out_key: NestedKey = ("metrics", "dimension_summary"), dims: int | Sequence[int] | None = None):
        super().__init__()
        _check_keys("in_key and out_key must be TensorDict nested keys", in_key, out_key)
        self.in_key = in_key
        self.out_key = out_key
        self.dims = dims
        self.in_keys = [in_key]
        self.out_keys = [out_key]

    def forward(self, artifacts: TensorDictBase) -> TensorDictBase:
        dimensions = _stored(artifacts.get(self.in_key, None))
        if not isinstance(dimensions, torch.Tensor):
            raise InvalidArgumentType(f"Dimensions at {self.in_key!r} must be a tensor")
        over = self._reduced(dimensions.ndim)
        finite = torch.isfinite(dimensions)
        if not over:  # a single value: its own summary
            summary = {
                "count": finite.long(),
                "mean": torch.where(finite, dimensions, torch.nan),
                "std": torch.where(finite, 0.0, torch.nan).to(dimensions.dtype),
            }
        else:
            count = finite.sum(dim=over, keepdim=True)
            mean = torch.where(finite, dimensions, 0.0).sum(dim=over, keepdim=True) / count.clamp_min(1)
            variance = torch.where(finite, dimensions - mean, 0.0).square().sum(dim=over, keepdim=True) / count.clamp_min(1)
            none = count == 0
            summary = {
                "count": count.squeeze(over),
                "mean": mean.masked_fill(none, torch.nan).squeeze(over),
                "std": variance.sqrt().masked_fill(none, torch.nan).squeeze(over),
            }
        _store(artifacts, self.out_key, TensorDict(summary, batch_size=[]))
        return artifacts

    def _reduced(self, ndim: int) -> tuple:
        if self.dims is None:
            return tuple(range(ndim))
        given = (self.dims,) if isinstance(self.dims, int) else tuple(self.dims)
        dims = tuple(d + ndim if d < 0 else d for d in given)
        if not dims or len(set(dims)) != len(dims) or any(not 0 <= d < ndim for d in dims):
            raise InvalidArgument(f"Summary dimensions must be unique valid dimensions of a {ndim}-d tensor; got {self.dims}")
        return dims


class AnalysisWorkflow:
    """Steps run in order on one artifacts TensorDict (the part of tdhook's `Workflow` these
    analyses use): a method is prepared on the model and called inside its context, a TensorDict
    module is called. `workflow(model, artifacts)` returns the artifacts."""

    def __init__(self, *steps: HookingContextFactory | TensorDictModuleBase):
        for index, step in enumerate(steps):
            if not isinstance(step, (HookingContextFactory, TensorDictModuleBase)):
                raise InvalidArgumentType(
                    f"Workflow step {index} must be a configured method or TensorDictModuleBase, got {type(step).__name__}"
                )
        self.steps = steps

    def run(self, model: nn.Module, data: TensorDictBase) -> TensorDictBase:
        for step in self.steps:
            if isinstance(step, HookingContextFactory):
                with step.prepare(model) as hooked:
                    data = hooked(data)
            else:
                data = step(data)
        return data

    __call__ = run


def conditioned_dimension_workflow(
    cache: ActivationCaching,
    activation_key: NestedKey,
    transform: Callable[[torch.Tensor], torch.Tensor],
    estimator: TensorDictModuleBase,
    *,
    cache_key: NestedKey = ("activations", "cache"),
    sample_key: NestedKey = ("activations", "samples"),
    dimension_key: NestedKey = ("metrics", "dimension"),
    summary_key: NestedKey = ("metrics", "dimension_summary"),
    summary_dims: int | Sequence[int] | None = None,
) -> AnalysisWorkflow:
    """Capture (one compiled pass), samples, estimation and summary, in that order."""
    if cache.cache_key != cache_key:
        raise InvalidArgument(
            f"ActivationCaching publishes {cache.cache_key!r}; configure cache_key={cache_key!r} on the method"
        )
    return AnalysisWorkflow(
        cache,
        ActivationSamples(activation_key, transform, cache_key=cache_key, out_key=sample_key),
        DimensionEstimation(estimator, in_key=sample_key, out_key=dimension_key),
        DimensionSummary(in_key=dimension_key, out_key=summary_key, dims=summary_dims),
    )


__all__ = [
    "ActivationSamples",
    "AnalysisWorkflow",
    "DimensionEstimation",
    "DimensionSummary",
    "channel_conditioned_samples",
    "conditioned_dimension_workflow",
    "spatial_conditioned_samples",
]
