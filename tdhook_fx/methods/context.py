"""`prepare(model)` contexts: a method bound to a model, active inside a `with` block.

As in tdhook, `Method(...).prepare(model, in_keys, out_keys)` returns a `HookingContext`;
entering it gives the `HookedModule`, which may only be called inside the block. Nothing is
installed on the model: on enter a method only computes what its program needs (pruning
masks, probes), and on exit nothing needs removing, since a compiled program never mutates
the model.

A method subclasses `HookingContextFactory` and implements one of:
- `_build(hooked, builder, table, td)`: add statements for one pass of the model (optionally
  returning `finish(result, td)`, called after the run), or
- `_forward(hooked, td)`: a forward of its own (several passes, other input groups);
plus `_enter(hooked)` / `_exit(hooked)` where it has per-context state.
"""

from __future__ import annotations

from contextlib import contextmanager

from tensordict import TensorDict, TensorDictBase
from torch import nn

from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.programs import MethodUsageError


class HookingContext:
    """A method bound to a model; `with context as hooked:` activates it."""

    def __init__(
        self, factory: HookingContextFactory, module: nn.Module, in_keys=None, out_keys=None, **kwargs
    ):
        self._factory = factory
        self._hooked = factory._hooked_module_class(
            module, in_keys, out_keys, hooking_context=self, method=factory, **factory._hooked_module_kwargs
        )
        self._active = False
        self._disabled = False

    @property
    def module(self) -> HookedModule:
        return self._hooked

    @property
    def active(self) -> bool:
        return self._active

    @property
    def disabled(self) -> bool:
        return self._disabled

    def __enter__(self) -> HookedModule:
        if self._active:
            raise MethodUsageError("Cannot enter a method context twice")
        self._active = True
        try:
            self._on_enter()
            self._factory._enter(self._hooked)
        except BaseException:
            self._active = False
            raise
        return self._hooked

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            self._factory._exit(self._hooked)
        finally:
            self._active = False
        return False

    def _on_enter(self) -> None:
        pass

    @contextmanager
    def disable_hooks(self):
        """Inside this block the hooked module runs the plain model (no method)."""
        self._disabled = True
        try:
            yield self._hooked
        finally:
            self._disabled = False

    @contextmanager
    def disable(self):
        """Inside this block, the model itself (nothing to restore: it was never changed)."""
        yield self._hooked.td_module


class HookingContextWithCache(HookingContext):
    """A context with a TensorDict cache, cleared on each enter unless `clear_cache=False`."""

    def __init__(
        self,
        factory,
        module,
        in_keys=None,
        out_keys=None,
        cache: TensorDictBase | None = None,
        clear_cache: bool = True,
    ):
        super().__init__(factory, module, in_keys, out_keys)
        self._cache = TensorDict() if cache is None else cache
        self._clear_cache = clear_cache

    @property
    def cache(self) -> TensorDictBase:
        return self._cache

    def _on_enter(self) -> None:
        if self._clear_cache:
            for key in list(self._cache.keys()):
                del self._cache[key]


class HookingContextFactory:
    """Base of every method: `prepare(model, in_keys=None, out_keys=None)` -> a context."""

    _hooking_context_class = HookingContext
    _hooked_module_class = HookedModule

    def __init__(self):
        self._hooking_context_kwargs: dict = {}
        self._hooked_module_kwargs: dict = {}

    def prepare(self, module: nn.Module, in_keys=None, out_keys=None) -> HookingContext:
        """Bind this method to `module`; `in_keys` may be `{kwarg: td_key}` to pass keywords."""
        return self._hooking_context_class(self, module, in_keys, out_keys, **self._hooking_context_kwargs)

    def _enter(self, hooked: HookedModule) -> None:
        pass

    def _exit(self, hooked: HookedModule) -> None:
        pass
