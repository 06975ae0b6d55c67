"""tdhook's `Target`: a serializable selection of units in an activation, a gradient or a parameter.

`Target("blocks.1.mlp", "activation", -1, (3, 7))` names units 3 and 7 of the last axis of
`blocks.1.mlp`'s output. `output_path` picks one tensor inside a structured value (a tuple
slot, a mapping key), `occurrences` picks calls of a module called more than once (`None`:
every call), `parameter` names a parameter of the module for `kind="parameter"`. Targets are
data: `to_json()` / `from_json()` round-trip, `validate(model)` checks one against a model
without running anything (paths are parsed, never evaluated, and no property is read).

Where tdhook installs a hook on the module, tdhook_fx compiles the target into a DSL site
with a tensor index (`tdhook_fx.methods.targets`): `save blocks.1.mlp[..., 3:4]`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Literal

from tensordict import TensorDictBase
from torch import Tensor, nn

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, UnknownModulePath
from tdhook_fx.methods.paths import resolve_submodule

TargetKind = Literal["activation", "gradient", "parameter"]
OutputPathComponent = int | str
KINDS = ("activation", "gradient", "parameter")


def _is_int(value) -> bool:
    return type(value) is int


@dataclass(frozen=True)
class Target:
    """A selection along `feature_axis` (`indices`) of one module's value; see the module doc."""

    module_path: str
    kind: TargetKind
    feature_axis: int
    indices: tuple[int, ...]
    parameter: str | None = None
    output_path: tuple[OutputPathComponent, ...] = ()
    occurrences: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"Invalid target kind: {self.kind!r} (one of {', '.join(KINDS)})")
        if not _is_int(self.feature_axis):
            raise InvalidArgumentType(f"feature_axis must be an integer, not {type(self.feature_axis).__name__}")
        if not self.indices:
            raise InvalidArgument("indices must contain at least one selection")
        if not all(_is_int(i) for i in self.indices):
            raise InvalidArgumentType("indices must be integers")
        if self.kind == "parameter" and not self.parameter:
            raise InvalidArgument("parameter targets require a parameter name (parameter='weight')")
        if self.kind != "parameter" and self.parameter is not None:
            raise InvalidArgument("parameter is only valid for parameter targets")
        if not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in self.output_path):
            raise InvalidArgumentType("output_path components must be integer slots or string mapping keys")
        if self.kind == "parameter" and self.output_path:
            raise InvalidArgument("output_path is only valid for activation and gradient targets")
        if self.occurrences is not None:
            self._check_occurrences()

    def _check_occurrences(self) -> None:
        occurrences = self.occurrences
        if not isinstance(occurrences, tuple):
            raise InvalidArgumentType("occurrences must be a tuple of integers or None")
        if not occurrences:
            raise InvalidArgument("occurrences must contain at least one selection")
        if not all(_is_int(i) for i in occurrences):
            raise InvalidArgumentType("occurrences must contain only integers")
        if any(i < 0 for i in occurrences):
            raise InvalidArgument("occurrences must be non-negative")
        if any(a >= b for a, b in zip(occurrences, occurrences[1:])):
            raise InvalidArgument("occurrences must be unique and strictly increasing")
        if self.kind == "parameter":
            raise InvalidArgument("occurrences are only valid for activation and gradient targets")

    # ---- serialization ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """A JSON-compatible dict (tuples become lists)."""
        data = asdict(self)
        data["indices"] = list(self.indices)
        data["output_path"] = list(self.output_path)
        if self.occurrences is not None:
            data["occurrences"] = list(self.occurrences)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Target:
        """The target `to_dict` described."""
        values = dict(data)
        if "indices" not in values:
            raise InvalidArgument("Target data is missing indices")
        values["indices"] = tuple(values["indices"])
        values["output_path"] = tuple(values.get("output_path", ()))
        if values.get("occurrences") is not None:
            values["occurrences"] = tuple(values["occurrences"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Target:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise InvalidArgument("Target JSON is invalid") from None
        if not isinstance(data, dict):
            raise InvalidArgument("Target JSON must contain an object")
        return cls.from_dict(data)

    # ---- checking against a model ------------------------------------------------------------------

    def validate(self, model: nn.Module) -> nn.Module:
        """The module this target names in `model` (its parameter checked too); nothing is run."""
        if not isinstance(self.module_path, str):
            raise InvalidArgument(f"Target path {self.module_path!r} does not resolve to a module")
        try:
            module = resolve_submodule(model, self.module_path)
        except UnknownModulePath as error:
            raise InvalidArgument(f"Target path '{self.module_path}' does not resolve to a module: {error}") from None
        if self.kind == "parameter":
            self._selection(self.parameter_of(module))
        return module

    def parameter_of(self, module: nn.Module) -> Tensor:
        """The parameter a parameter target names on its module."""
        *owners, name = self.parameter.split(".")
        owner = module
        for step in owners:
            owner = owner._modules.get(step)
            if owner is None:
                break
        found = None if owner is None else owner._parameters.get(name)
        if found is None:
            raise InvalidArgument(f"Module '{self.module_path}' has no parameter '{self.parameter}'")
        return found

    def axis(self, ndim: int) -> int:
        """`feature_axis` as a non-negative dimension of a tensor with `ndim` dimensions."""
        axis = self.feature_axis + ndim if self.feature_axis < 0 else self.feature_axis
        if not 0 <= axis < ndim:
            raise InvalidArgument(f"feature_axis {self.feature_axis} is out of bounds for a {ndim}-D tensor")
        return axis

    def check_indices(self, shape: tuple) -> int:
        """The axis, after checking every index fits `shape` along it."""
        axis = self.axis(len(shape))
        size = shape[axis]
        for index in self.indices:
            if not -size <= index < size:
                raise InvalidArgument(
                    f"index {index} is out of bounds for axis {self.feature_axis} with size {size}"
                )
        return axis

    # ---- the selection on plain values (as a hook sees them) ------------------------------------------

    def _selection(self, tensor: Tensor) -> tuple:
        axis = self.check_indices(tuple(tensor.shape))
        return tuple(list(self.indices) if dim == axis else slice(None) for dim in range(tensor.ndim))

    def _select(self, tensor: Tensor) -> Tensor:
        return tensor[self._selection(tensor)]

    def _assign(self, tensor: Tensor, value) -> None:
        tensor[self._selection(tensor)] = value

    def select_output(self, value: object) -> Tensor:
        """The selected units of the tensor `output_path` picks in a structured value."""
        return self._select(self._output_tensor(value, self.output_path))

    def replace_output(self, value: object, replacement) -> object:
        """`value` with only the selected units replaced; its structure (types included) kept."""
        tensor = self._output_tensor(value, self.output_path).clone()
        self._assign(tensor, replacement)
        return self._replace_output_tensor(value, self.output_path, tensor)

    @staticmethod
    def _resolved_output_path(value: object, path: tuple) -> tuple:
        if path or isinstance(value, Tensor):
            return tuple(path)
        if isinstance(value, (tuple, list)) and len(value) == 1:
            return (0,)
        raise InvalidArgument("Structured hook values require Target.output_path to select a tensor leaf")

    @classmethod
    def _output_tensor(cls, value: object, path: tuple = ()) -> Tensor:
        current = value
        for component in cls._resolved_output_path(value, path):
            current = _child(current, component)
        if not isinstance(current, Tensor):
            raise InvalidArgument("Target.output_path must select a tensor leaf")
        return current

    @classmethod
    def _replace_output_tensor(cls, value: object, path: tuple, replacement: Tensor) -> object:
        resolved = cls._resolved_output_path(value, path)
        if not resolved:
            return replacement
        component, rest = resolved[0], tuple(resolved[1:])
        inner = cls._replace_output_tensor(_child(value, component), rest, replacement)
        return _with_child(value, component, inner)


def _child(value: object, component: OutputPathComponent) -> object:
    """One step of an output path: a slot of a tuple or list, a key of a mapping."""
    if isinstance(component, int) and isinstance(value, (tuple, list)):
        if not -len(value) <= component < len(value):
            raise InvalidArgument(f"output_path slot {component} is out of range")
        return value[component]
    if isinstance(component, str) and isinstance(value, (Mapping, TensorDictBase)):
        if component not in value.keys():
            raise InvalidArgument(f"output_path key {component!r} is missing")
        return value[component]
    raise InvalidArgument(f"output_path component {component!r} does not match the hook value structure")


def _with_child(value: object, component: OutputPathComponent, inner: object) -> object:
    """A copy of `value` (same type) whose `component` is `inner`."""
    if isinstance(component, int) and isinstance(value, tuple):
        items = list(value)
        items[component] = inner
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(component, int) and isinstance(value, list):
        items = list(value)
        items[component] = inner
        return items
    if isinstance(component, str) and isinstance(value, TensorDictBase):
        copied = value.clone(recurse=False)
        copied.set(component, inner)
        return copied
    if isinstance(component, str) and isinstance(value, Mapping):
        copied = copy.copy(value)
        if not isinstance(copied, MutableMapping):
            raise InvalidArgument(
                f"mapping type {type(value).__name__} does not support structure-preserving replacement"
            )
        copied[component] = inner
        return copied
    raise InvalidArgument(f"output_path component {component!r} does not match the hook value structure")


def activation_target(value: str | Target, *, argument: str) -> tuple[str, Target | None]:
    """A method's module entry: a module path, or an activation `Target` (its path and itself)."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, Target):
        raise InvalidArgumentType(f"{argument} entries must be module paths or Targets, not {type(value).__name__}")
    if value.kind != "activation":
        raise InvalidArgument(f"activation methods require activation Targets; {argument} has a {value.kind} Target")
    return value.module_path, value


__all__ = ["OutputPathComponent", "Target", "TargetKind", "activation_target"]
