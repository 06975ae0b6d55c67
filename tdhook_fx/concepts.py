"""Concepts (tdhook.concepts): pick the channel that separates labelled concept examples, then
attribute through that channel only (concept relevance propagation, Achtibat et al. 2023).

```python
artifacts = TensorDict({"input": x, "concept_labels": labels}, batch_size=[n])
with LRP(input_modules=["layer3"], attribution_key=("attributions", "concept_examples")).prepare(model) as h:
    artifacts = h(artifacts)                               # relevance at layer3's output
artifacts = ConceptSelection(("attributions", "concept_examples", "layer3"))(artifacts)
with ChannelConditionedLRP(LRP(rule_mapper=...), condition_module="layer3", gradient_channel_axis=1).prepare(model) as h:
    artifacts = h(artifacts)   # ("attributions", "conditioned", "input"): relevance through that channel
```
"""

from __future__ import annotations

from copy import copy
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType
from tdhook_fx.methods.context import HookingContextFactory


def _is_key(value) -> bool:
    return isinstance(value, str) or (isinstance(value, tuple) and bool(value) and all(isinstance(p, str) for p in value))


class ConceptSelection(TensorDictModuleBase):
    """Reads per-example relevances (batch, channels, ...) at `relevance_key` and binary concept
    labels at `labels_key`; writes at `out_key` the channel whose mean |relevance| (summed over
    the trailing dims first, signs kept) is highest on the positive examples relative to the
    negative ones (`direction="negative"`: lowest), with the means, all scores and the score."""

    def __init__(
        self,
        relevance_key: NestedKey,
        *,
        labels_key: NestedKey = "concept_labels",
        out_key: NestedKey = ("metrics", "concept_selection"),
        direction: Literal["positive", "negative"] = "positive",
    ):
        super().__init__()
        if direction not in ("positive", "negative"):
            raise InvalidArgument(f"direction must be 'positive' or 'negative'; got {direction!r}")
        if not all(_is_key(key) for key in (relevance_key, labels_key, out_key)):
            raise InvalidArgumentType("Concept selection keys must be TensorDict nested keys")
        self.relevance_key = relevance_key
        self.labels_key = labels_key
        self.out_key = out_key
        self.direction = direction
        self.in_keys = [relevance_key, labels_key]
        self.out_keys = [out_key]

    def forward(self, artifacts: TensorDictBase) -> TensorDictBase:
        relevances, labels = artifacts.get(self.relevance_key), artifacts.get(self.labels_key)
        if not isinstance(relevances, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise InvalidArgumentType("Concept selection requires tensor relevances and labels")
        batch = tuple(artifacts.batch_size)
        if relevances.ndim < len(batch) + 1:
            raise InvalidArgument("Concept relevances must have TensorDict batch and channel dimensions")
        if relevances.shape[len(batch)] == 0:
            raise InvalidArgument("Concept relevances must have a non-empty channel dimension")
        if tuple(labels.shape) != batch:
            raise InvalidArgument(f"Concept labels must match the TensorDict batch shape {list(batch)}; got {list(labels.shape)}")
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise InvalidArgument("Concept labels must be binary (0 or 1)")
        positive = labels.reshape(-1).bool().to(relevances.device)
        if bool(positive.all()) or not bool(positive.any()):
            raise InvalidArgument("Concept examples must contain both positive and negative labels")
        per_channel = relevances.reshape(labels.numel(), *relevances.shape[len(batch):])
        per_channel = per_channel.flatten(start_dim=2).sum(-1) if per_channel.ndim > 2 else per_channel
        magnitude = per_channel.abs()  # after the spatial sum: opposite signs cancel first
        positive_mean, negative_mean = magnitude[positive].mean(0), magnitude[~positive].mean(0)
        scores = positive_mean - negative_mean
        sign = 1 if self.direction == "positive" else -1
        channel = scores.argmax() if sign > 0 else scores.argmin()

        def each(value: torch.Tensor) -> torch.Tensor:
            return value.expand(*batch, *value.shape)

        selection = {
            "positive_mean": each(positive_mean),
            "negative_mean": each(negative_mean),
            "scores": each(scores),
            "channel": each(channel.long()),
            "direction": each(torch.tensor(sign, device=scores.device)),
            "score": each(scores[channel]),
        }
        artifacts.set(self.out_key, TensorDict(selection, batch_size=batch))
        return artifacts


def concept_channel_gradient_callback(channel: int, direction: int, *, channel_axis: int = -1):
    """An `output_grad_callbacks` entry that keeps the gradient (relevance) of one channel only,
    times `direction` (+1 or -1), along `channel_axis` (1 for a CNN's (batch, channels, h, w))."""
    if channel < 0:
        raise InvalidArgument("Concept channel must be non-negative")
    if direction not in (-1, 1):
        raise InvalidArgument("Concept direction must be either -1 or 1")

    def callback(grad_output, **kwargs):
        gradient = grad_output[0]
        axis = channel_axis % gradient.ndim if gradient.ndim else 0
        if gradient.ndim < 2 or channel >= gradient.shape[axis]:
            raise InvalidArgument(f"Concept channel {channel} is invalid for gradient shape {tuple(gradient.shape)}")
        mask = torch.zeros_like(gradient)
        mask.select(axis, channel).fill_(direction)
        return (gradient * mask,)

    return callback


def uniform_selection(selection) -> tuple[int, int]:
    """(channel, direction) from a selection TensorDict, the same for every example."""
    if not isinstance(selection, TensorDictBase) or not {"channel", "direction"} <= set(selection.keys()):
        raise InvalidArgument("Concept selection must provide 'channel' and 'direction'")
    channel, direction = selection.get("channel"), selection.get("direction")
    if not isinstance(channel, torch.Tensor) or not isinstance(direction, torch.Tensor):
        raise InvalidArgumentType("Concept selection channel and direction must be tensors")
    if channel.numel() == 0 or direction.numel() == 0:
        raise InvalidArgument("Concept selection channel and direction cannot be empty")
    if any(t.dtype == torch.bool or t.is_floating_point() for t in (channel, direction)):
        raise InvalidArgumentType("Concept selection channel and direction must use integer tensor dtypes")
    if not (bool((channel == channel.flatten()[0]).all()) and bool((direction == direction.flatten()[0]).all())):
        raise InvalidArgument("Concept selection must be identical for every example in the batch")
    chosen, sign = int(channel.flatten()[0]), int(direction.flatten()[0])
    if chosen < 0:
        raise InvalidArgument("Concept selection channel must be non-negative")
    if sign not in (-1, 1):
        raise InvalidArgument("Concept selection direction must be either -1 or 1")
    return chosen, sign


class ChannelConditionedLRP(HookingContextFactory):
    """`base` LRP with the relevance at `condition_module`'s output kept for one channel only: the
    one the TensorDict names at `selection_key` (`channel`, `direction`, e.g. from
    `ConceptSelection`), read on every call. Attributions go to `attribution_key`."""

    def __init__(
        self,
        base: LRP,
        *,
        condition_module: str,
        gradient_channel_axis: int = -1,
        selection_key: NestedKey = ("metrics", "concept_selection"),
        attribution_key: NestedKey = ("attributions", "conditioned"),
    ):
        super().__init__()
        if not isinstance(base, LRP):
            raise InvalidArgumentType(f"base must be an LRP method; got {type(base).__name__}")
        if not condition_module:
            raise InvalidArgument("condition_module must be non-empty")
        if not _is_key(selection_key) or not _is_key(attribution_key):
            raise InvalidArgumentType("selection_key and attribution_key must be TensorDict nested keys")
        if condition_module in base._output_grad_callbacks:
            raise InvalidArgument(f"LRP method already has a gradient callback for {condition_module!r}")
        self.base = base
        self.condition_module = condition_module
        self.gradient_channel_axis = gradient_channel_axis
        self.selection_key = selection_key
        self.attribution_key = attribution_key

    def _bound(self, channel: int = 0, direction: int = 1) -> LRP:
        bound = copy(self.base)
        bound._attr_key = self.attribution_key
        bound._additional_init_keys = [
            *self.base._additional_init_keys, join_keys(self.selection_key, "channel"), join_keys(self.selection_key, "direction")
        ]
        callback = concept_channel_gradient_callback(channel, direction, channel_axis=self.gradient_channel_axis)
        bound._output_grad_callbacks = {**self.base._output_grad_callbacks, self.condition_module: callback}
        return bound

    def hooked_keys(self, interface) -> tuple[list, list]:
        return self._bound().hooked_keys(interface)

    def check(self, interface) -> None:
        self._bound().check(interface)

    def enter(self, hooked) -> None:
        self.base.enter(hooked)

    def forward(self, hooked, td: TensorDictBase) -> TensorDictBase:
        channel, direction = uniform_selection(td.get(self.selection_key, None))
        bound = self._bound(channel, direction)
        bound._rules = self.base._rules
        return bound.forward(hooked, td)


__all__ = ["ChannelConditionedLRP", "ConceptSelection", "concept_channel_gradient_callback"]
