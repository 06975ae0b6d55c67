r"""ActivationCaching: save every module whose name matches a pattern, in one compiled pass.

`ActivationCaching(r"transformer\.h\.\d+\.mlp$")` compiles to one `save` per matched module
that the model calls (`save transformer.h.0.mlp as saved_0`, ...); a `Target` compiles to one
indexed `save` (`save linear2[..., 0:3] as saved_0`). As in tdhook 0.3.0 the values land in the
context's `cache` (keyed by module name, or `(direction, name)`) and a copy of it in the returned
TensorDict under `cache_key` ("cache"); a `callback(module, args, output, key, direction)` chooses
what is stored (required where a module returns a tuple).

A locked or memory-mapped cache (with `clear_cache=False`) is written in place (`set_`): it
must hold every key, with its final shape, before the first call. Like tdhook's, a cache holds
the last call's values. Backward directions (`bwd`, `bwd_pre`) are stored when the caller's
backward reaches the module (see `tdhook_fx.methods.reading`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from tdhook_fx._types import is_nested_key
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MethodUsageError, TdhookFxError
from tdhook_fx.methods.context import HookingContextWithCache
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.reading import ModuleReadingMethod
from tdhook_fx.targets import Target


def _key_path(key: NestedKey) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


def _overlap(left: NestedKey, right: NestedKey) -> bool:
    left, right = _key_path(left), _key_path(right)
    common = min(len(left), len(right))
    return left[:common] == right[:common]


def store(cache: TensorDictBase, key, value) -> None:
    """`cache[key] = value`; a locked (or memory-mapped) cache is written in place, as tdhook does."""
    if not isinstance(value, (torch.Tensor, TensorDictBase)):
        raise TdhookFxError(
            f"{type(value).__name__} values are not supported for caching, "
            "use a `callback` to return a tensor or a tensordict"
        )
    if not cache.is_locked:
        cache.set(key, value)
        return
    if key not in cache.keys(include_nested=True):
        raise MethodUsageError(
            f"Locked caches require a preallocated entry for {key!r}; "
            "create every cache key before locking or memory-mapping the TensorDict"
        )
    cache.set_(key, value)


class ActivationCachingModule(HookedModule):
    """The hooked module of `ActivationCaching`: publishes a copy of the cache at `cache_key`.

    The copy is shallow: the leaves of a caller's memory-mapped cache stay memory-mapped.
    """

    def __init__(self, *args, cache_key: NestedKey | None = "cache", **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_key = cache_key
        if cache_key is not None:
            if any(_overlap(cache_key, key) for key in self.interface.out_keys):
                raise InvalidArgument(f"Activation cache key {cache_key!r} collides with a model output key")
            self.out_keys = [*self.out_keys, cache_key]

    def finalize_tensordict(self, data: TensorDictBase) -> TensorDictBase:
        if self.cache_key is None:
            return data
        if self.hooking_context is None:
            raise MethodUsageError("ActivationCachingModule requires an active method context")
        data.set(self.cache_key, self.hooking_context.cache.copy())
        return data


class ActivationCaching(ModuleReadingMethod):
    """Cache the activations of the modules matching `key_pattern` (tdhook's `re.match`), or of a `Target`."""

    _hooking_context_class = HookingContextWithCache
    _hooked_module_class = ActivationCachingModule

    def __init__(
        self,
        key_pattern: str | Target,
        relative: bool = True,
        cache: TensorDictBase | None = None,
        callback: Callable | None = None,
        directions: list[str] | None = None,
        use_nested_keys: bool = False,
        clear_cache: bool = True,
        cache_key: NestedKey | None = "cache",
    ):
        super().__init__(key_pattern, relative, directions, callback=callback)
        if cache_key is not None and not is_nested_key(cache_key):
            raise InvalidArgumentType("cache_key must be a TensorDict nested key or None")
        if cache is not None and cache.is_locked and clear_cache:
            raise InvalidArgument("locked or memory-mapped caches require clear_cache=False")
        self._hooking_context_kwargs.update(cache=cache, clear_cache=clear_cache)
        self._hooked_module_kwargs.update(cache_key=cache_key)
        self._use_nested_keys = use_nested_keys or len(self._directions) > 1

    @property
    def cache_key(self) -> NestedKey | None:
        return self._hooked_module_kwargs["cache_key"]

    def read_key(self, ref, direction: str):
        return (direction, ref.key) if self._use_nested_keys else ref.key

    def consume(self, hooked, values, result, td, state) -> None:
        cache = hooked.hooking_context.cache
        for value in values:
            store(cache, self.read_key(value.ref, value.direction), value.read.tensor(result.saved))

    def consume_gradient(self, hooked, read, value, state) -> None:
        if isinstance(value, tuple) and len(value) == 1:
            value = value[0]  # (tdhook needs a callback for this too)
        if isinstance(value, tuple):
            raise TdhookFxError(
                f"{read.ref.key} has {len(value)} gradients at its {'inputs' if read.direction == 'bwd' else 'outputs'}; "
                "a cache holds one tensor\n  hint: pass a callback that picks one, e.g. "
                "callback=lambda **kw: kw['grad_output'][0]"
            )
        store(hooked.hooking_context.cache, read.key, value)
