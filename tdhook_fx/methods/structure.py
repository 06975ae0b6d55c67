"""The tensors inside a structured value (call arguments, a model's result) and how to put them back.

`flatten(value)` walks tuples (named ones too), lists and mappings (dicts, `UserDict`, Hugging
Face outputs) and returns a `Structure` and the tensor leaves in order; every other value is
kept as it is. `structure.rebuild(tensors)` makes a value of the same types with new tensors;
`structure.leaf(path)` tells which leaf an output path (tuple slots, mapping keys) names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tensordict import NonTensorData
from torch import fx

from tdhook_fx.errors import InvalidArgument


def _is_tensor(value) -> bool:
    return isinstance(value, (torch.Tensor, fx.Proxy))


@dataclass(frozen=True)
class Structure:
    """A value with its tensors taken out: `kind` "tensor" (leaf number `leaf`), "constant",
    "tuple", "list" or "mapping" (`items`: the children, `template`: the container to copy)."""

    kind: str
    leaf: int | None = None
    items: tuple = ()  # ((key or slot, Structure), ...)
    template: object = None

    def objects(self) -> list:
        """The constants that are not plain values (numbers, strings, None): objects kept by identity."""
        if self.kind == "constant":
            return [] if _plain(self.template) else [self.template]
        return [found for _, child in self.items for found in child.objects()]

    @property
    def signature(self) -> tuple:
        """What a compiled program depends on: the shape of the tree and its constants."""
        if self.kind == "tensor":
            return ("tensor",)
        if self.kind == "constant":
            value = self.template
            key = value.data if isinstance(value, NonTensorData) else value
            return ("constant", type(value).__qualname__, key if _plain(value) else id(value))
        return (self.kind, type(self.template).__qualname__, tuple((k, s.signature) for k, s in self.items))

    def rebuild(self, tensors) -> object:
        """A value of this structure holding `tensors` at its leaves."""
        if self.kind == "tensor":
            return tensors[self.leaf]
        if self.kind == "constant":
            return self.template
        values = [(key, child.rebuild(tensors)) for key, child in self.items]
        if self.kind == "list":
            return [v for _, v in values]
        if self.kind == "tuple":
            items = [v for _, v in values]
            return type(self.template)(*items) if hasattr(self.template, "_fields") else tuple(items)
        rebuilt = copy.copy(self.template)
        for key, value in values:
            rebuilt[key] = value
        return rebuilt

    def child(self, component) -> Structure:
        for key, child in self.items:
            if key == component:
                return child
        what = "slot" if isinstance(component, int) else "key"
        raise InvalidArgument(f"output_path {what} {component!r} is {'out of range' if what == 'slot' else 'missing'}")

    def leaf_at(self, path: tuple) -> int:
        """The leaf number of the tensor at `path` (a lone tuple element needs no path, as in tdhook)."""
        node = self
        if not path and node.kind in ("tuple", "list") and len(node.items) == 1:
            path = (0,)
        for component in path:
            if node.kind not in ("tuple", "list", "mapping"):
                raise InvalidArgument(f"output_path component {component!r} does not match the hook value structure")
            if (node.kind == "mapping") != isinstance(component, str):
                raise InvalidArgument(f"output_path component {component!r} does not match the hook value structure")
            node = node.child(component)
        if node.kind != "tensor":
            if not path:
                raise InvalidArgument("Structured hook values require Target.output_path to select a tensor leaf")
            raise InvalidArgument("Target.output_path must select a tensor leaf")
        return node.leaf

    @property
    def leaves(self) -> int:
        """How many distinct tensors the value holds."""
        return len(self._leaf_numbers())

    def _leaf_numbers(self) -> set[int]:
        if self.kind == "tensor":
            return {self.leaf}
        return set().union(*(child._leaf_numbers() for _, child in self.items))


def _plain(value) -> bool:
    if isinstance(value, NonTensorData):  # a TensorDict's non-tensor entry
        return _plain(value.data)
    return value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device))


def flatten(value) -> tuple[Structure, list]:
    """The structure of `value` and its tensor leaves, in order; a tensor found twice is one leaf
    (so that `a is b` still holds after `rebuild`)."""
    tensors: list = []
    return _walk(value, tensors, {}), tensors


def _walk(value, tensors: list, seen: dict) -> Structure:
    if _is_tensor(value):
        if id(value) not in seen:
            seen[id(value)] = len(tensors)
            tensors.append(value)
        return Structure("tensor", leaf=seen[id(value)])
    if isinstance(value, tuple):
        items = tuple((i, _walk(v, tensors, seen)) for i, v in enumerate(value))
        return Structure("tuple", items=items, template=value)
    if isinstance(value, list):
        return Structure("list", items=tuple((i, _walk(v, tensors, seen)) for i, v in enumerate(value)), template=value)
    if isinstance(value, Mapping) and hasattr(value, "__setitem__"):
        items = tuple((k, _walk(v, tensors, seen)) for k, v in value.items())
        return Structure("mapping", items=items, template=value)
    return Structure("constant", template=value)
