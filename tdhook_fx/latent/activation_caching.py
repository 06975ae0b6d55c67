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

from tdhook_fx.methods.context import HookingContextFactory, HookingContextWithCache
from tdhook_fx.methods.paths import match_modules, no_match_error
from tdhook_fx.methods.programs import FORWARD_PORT, MethodUsageError, add_read, calls


def _key_path(key: NestedKey) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


class ActivationCaching(HookingContextFactory):
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
        super().__init__()
        if cache is not None and cache.is_locked and clear_cache:
            raise ValueError("locked or memory-mapped caches require clear_cache=False")
        self._hooking_context_kwargs.update(cache=cache, clear_cache=clear_cache)
        self.key_pattern = key_pattern
        self._relative = relative
        self._callback = callback
        self._directions = list(directions or ["fwd"])
        for direction in self._directions:
            if direction not in FORWARD_PORT:
                raise MethodUsageError(
                    f"ActivationCaching direction {direction!r} needs gradients read after your backward, "
                    "which a cache filled by the forward pass cannot hold; "
                    f"use one of {sorted(FORWARD_PORT)}"
                )
        self._use_nested_keys = use_nested_keys or len(self._directions) > 1
        self._cache_key = cache_key

    @property
    def cache_key(self) -> NestedKey | None:
        return self._cache_key

    @property
    def additional_out_keys(self) -> list:
        return [] if self._cache_key is None else [self._cache_key]

    def prepare(self, module, in_keys=None, out_keys=None):
        context = super().prepare(module, in_keys, out_keys)
        if self._cache_key is not None:
            for key in context.module.interface.out_keys:
                left, right = _key_path(self._cache_key), _key_path(key)
                if left[: min(len(left), len(right))] == right[: min(len(left), len(right))]:
                    raise ValueError(
                        f"Activation cache key {self._cache_key!r} collides with a model output key"
                    )
        return context

    def _build(self, hooked, builder, table, td):
        interface = hooked.interface
        base = interface.base(self._relative)
        refs = match_modules(base, interface.model, self.key_pattern)
        if not refs:
            raise no_match_error(base, self.key_pattern)
        reads = []
        for direction in self._directions:
            for ref in refs:
                if not calls(table, ref.name):
                    continue
                key = (direction, ref.key) if self._use_nested_keys else ref.key
                read = add_read(
                    builder, table, ref.key, ref.name, ref.module, direction, self._callback, key=key
                )
                if read is not None:
                    reads.append((key, read))
        cache = hooked.hooking_context.cache

        def store(result, td: TensorDictBase) -> None:
            for key, read in sorted(reads, key=lambda item: item[1].order):
                cache.set(key, read.tensor(result.saved))
            if self._cache_key is not None:
                td.set(self._cache_key, cache.copy())

        return store
