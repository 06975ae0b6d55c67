"""The model behind a TensorDict: which keys a method reads and writes, and where paths start."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import nn

from tdhook_fx._types import is_nested_key
from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.compiler.pipeline import DEFAULT_IN_KEYS, DEFAULT_OUT_KEYS
from tdhook_fx.errors import InvalidArgument, MethodUsageError, MissingInputKey, TdhookFxError


@dataclass(frozen=True)
class ModelInterface:
    """How a TensorDict feeds a model: which keys it reads and writes, and where paths start.

    `model` is the module that gets compiled; `root` is where relative paths start (the
    model, or a caller-given TensorDictModule as tdhook does); `hook_root` is where
    `relative=False` paths start (a `TensorDictModule` around the model, so `module.0`).
    """

    model: nn.Module
    root: nn.Module
    hook_root: nn.Module
    in_keys: tuple  # the TensorDict keys holding the model inputs, in call order
    call_keys: tuple  # the names the compiler gets (keyword names for in_keys={kwarg: key})
    out_keys: tuple

    @classmethod
    def build(cls, module: nn.Module, in_keys=None, out_keys=None) -> ModelInterface:
        """The interface of `module` (a plain module, or a TensorDictModule with its own keys).

        `in_keys` may be a list (inputs passed in order) or `{forward keyword: TensorDict key}`
        (tdhook's `in_keys={"inputs_embeds": "embeds"}`); keys given with a TensorDictModule must
        be among its own.
        """
        if isinstance(module, TensorDictModule):
            _check_subset(in_keys, module.in_keys, "in_keys")
            _check_subset(out_keys, module.out_keys, "out_keys")
            _check_selection(module)
            kwargs = getattr(module, "_kwargs", None)
            call_keys = tuple(kwargs) if kwargs else tuple(module.in_keys)
            model = module.module if isinstance(module.module, nn.Module) else _function_module(module)
            return cls(model, module, module, tuple(module.in_keys), call_keys, tuple(module.out_keys))
        if isinstance(module, TensorDictModuleBase):
            raise MethodUsageError(
                f"tdhook_fx compiles plain nn.Modules and TensorDictModules, not a {type(module).__name__}\n"
                "  hint: prepare the nn.Module inside it, with in_keys=[...] and out_keys=[...]"
            )
        if isinstance(in_keys, dict):
            call_keys, td_keys = tuple(in_keys), tuple(in_keys.values())
        else:
            td_keys = tuple(in_keys or DEFAULT_IN_KEYS)
            call_keys = td_keys
        out_keys = tuple(out_keys or DEFAULT_OUT_KEYS)
        wrapper = TensorDictModule(module, list(td_keys), list(out_keys))
        return cls(module, module, wrapper, td_keys, call_keys, out_keys)

    def base(self, relative: bool) -> nn.Module:
        return self.root if relative else self.hook_root

    def inputs(self, td: TensorDictBase, group=None, purpose: str = "model input", hint: str = "") -> tuple:
        """The model inputs in `td` (or under `(group, key)`), each checked to be there."""
        values = []
        for key in self.in_keys:
            full = key if group is None else join_keys(group, key)
            values.append(require(td, full, purpose, hint))
        return tuple(values)


def _check_subset(given, available, what: str) -> None:
    for key in given or []:
        if not is_nested_key(key):
            raise InvalidArgument(f"{what} must be TensorDict nested keys, got {type(key)}")
        if key not in available:
            raise InvalidArgument(f"Key {key} not in module.{what}")


def _check_selection(module: TensorDictModule) -> None:
    """Outputs selected with `select_out_keys` must be the first ones: a compiled call picks the
    model's outputs by position."""
    selected, declared = list(module.out_keys), list(module.out_keys_source)
    if selected != declared[: len(selected)]:
        raise MethodUsageError(
            f"the TensorDictModule selects out_keys {selected} of {declared}; tdhook_fx picks outputs by position, "
            "so only a leading selection can be compiled\n"
            "  hint: reset_out_keys() on it, or wrap the model so that the wanted outputs come first"
        )


class _FunctionAsModule(nn.Module):
    """A plain function that a TensorDictModule wraps, as a module the compiler can capture."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *args, **kwargs):
        return self.function(*args, **kwargs)


_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _function_module(module: TensorDictModule) -> nn.Module:
    """One `_FunctionAsModule` per TensorDictModule (captures are cached per module object)."""
    wrapped = _FUNCTIONS.get(module)
    if wrapped is None or wrapped.function is not module.module:
        wrapped = _FUNCTIONS[module] = _FunctionAsModule(module.module)
    return wrapped


def never_called(key: str, consequence: str) -> TdhookFxError:
    """The error for a module the method names but the model does not call on these inputs."""
    return TdhookFxError(f"{key} is never called when the model runs on these inputs, so {consequence}")


def require(td: TensorDictBase, key, purpose: str, hint: str = "") -> Any:
    """`td[key]`, or a `MissingInputKey` that names the key, why it is needed, and the fix."""
    value = td.get(key, None)
    if value is None:
        keys = sorted(map(str, td.keys(include_nested=True, leaves_only=True)))
        message = f"the input TensorDict has no {key!r} ({purpose}); its keys: {keys}"
        raise MissingInputKey(message + (f"\n  hint: {hint}" if hint else ""))
    return value
