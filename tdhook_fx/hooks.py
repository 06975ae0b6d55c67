"""tdhook's import path `tdhook.hooks`: the names its users import from there, without hooks.

`CacheProxy` is where tdhook 0.1.3 kept it (a value a `run()` block fills); `MutableWeakRef` and
`TensorDictRef` are the references tdhook's operators share a cache through
(`tdhook_fx.modules.ModuleCallWithCache`); the path helpers are `tdhook_fx.paths`'. tdhook's hook registration helpers have no
counterpart: tdhook_fx never registers a hook on the model; every method is a compiled program.
"""

from __future__ import annotations

import weakref
from typing import Generic, Literal, TypeVar

from tensordict import TensorDictBase

from tdhook_fx.methods.reads import DIRECTION_TO_TYPE
from tdhook_fx.methods.run import CacheProxy
from tdhook_fx.paths import resolve_submodule_path, submodule_path_to_name

HookDirection = Literal["fwd", "bwd", "fwd_pre", "bwd_pre", "fwd_kwargs", "fwd_pre_kwargs"]
T = TypeVar("T")


class MutableWeakRef(Generic[T]):
    """A weak reference whose referee can be replaced (`set`); `resolve()` is None once it is gone."""

    def __init__(self, referee: T):
        self._ref = weakref.ref(referee)

    def resolve(self) -> T | None:
        return self._ref()

    def set(self, referee: T) -> None:
        self._ref = weakref.ref(referee)


class TensorDictRef:
    """A strong reference to a TensorDict, with `MutableWeakRef`'s interface."""

    def __init__(self, td: TensorDictBase | None):
        self._td = td

    def resolve(self) -> TensorDictBase | None:
        return self._td

    def set(self, td: TensorDictBase) -> None:
        self._td = td


__all__ = [
    "DIRECTION_TO_TYPE",
    "CacheProxy",
    "HookDirection",
    "MutableWeakRef",
    "TensorDictRef",
    "resolve_submodule_path",
    "submodule_path_to_name",
]
