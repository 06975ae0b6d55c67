r"""ActivationCaching: save every module whose name matches a pattern, in one compiled pass.

`ActivationCaching(r"transformer\.h\.\d+\.mlp$")` compiles to one `save` per matched module
that the model calls (`save transformer.h.0.mlp as saved_0`, ...). As in tdhook 0.3.0 the
values land in the context's `cache` (keyed by module name, or `(direction, name)`) and a
copy of it in the returned TensorDict under `cache_key` ("cache"); a `callback(module, args,
output, key, direction)` chooses what is stored (required where a module returns a tuple).
"""

from __future__ import annotations

from collections.abc import Callable

from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from tdhook_fx.errors import InvalidArgument
from tdhook_fx.methods.context import HookingContextWithCache
from tdhook_fx.methods.reading import ModuleReadingMethod


def _key_path(key: NestedKey) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


class ActivationCaching(ModuleReadingMethod):
    """Cache the activations of the modules matching `key_pattern` (tdhook's `re.match`)."""

    _hooking_context_class = HookingContextWithCache

    def __init__(
        self,
        key_pattern: str,
        relative: bool = True,
        cache: TensorDictBase | None = None,
        callback: Callable | None = None,
        directions: list[str] | None = None,
        use_nested_keys: bool = False,
        clear_cache: bool = True,
        cache_key: NestedKey | None = "cache",
    ):
        super().__init__(key_pattern, relative, directions, callback=callback)
        if cache is not None and cache.is_locked and clear_cache:
            raise InvalidArgument("locked or memory-mapped caches require clear_cache=False")
        self._hooking_context_kwargs.update(cache=cache, clear_cache=clear_cache)
        self._use_nested_keys = use_nested_keys or len(self._directions) > 1
        self._cache_key = cache_key

    @property
    def cache_key(self) -> NestedKey | None:
        return self._cache_key

    def hooked_keys(self, interface) -> tuple[list, list]:
        extra = [] if self._cache_key is None else [self._cache_key]
        return list(interface.in_keys), list(interface.out_keys) + extra

    def check(self, interface) -> None:
        if self._cache_key is None:
            return
        for key in interface.out_keys:
            left, right = _key_path(self._cache_key), _key_path(key)
            common = min(len(left), len(right))
            if left[:common] == right[:common]:
                raise InvalidArgument(f"Activation cache key {self._cache_key!r} collides with a model output key")

    def read_key(self, ref, direction: str):
        return (direction, ref.key) if self._use_nested_keys else ref.key

    def consume(self, hooked, values, result, td, state) -> None:
        cache = hooked.hooking_context.cache
        for value in values:
            cache.set(self.read_key(value.ref, value.direction), value.read.tensor(result.saved))
        if self._cache_key is not None:
            td.set(self._cache_key, cache.copy())
