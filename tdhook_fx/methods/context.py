"""The one method framework: a method is a `HookingContextFactory`; `prepare(model)` binds it.

As in tdhook, `Method(...).prepare(model, in_keys, out_keys)` returns a `HookingContext`;
entering it gives the `HookedModule`, which may only be called inside the block. Nothing is
installed on the model: on enter a method only computes what its programs need (pruning
masks, probes), and on exit nothing needs removing, since a compiled program never changes
the model.

The protocol every method implements (and nothing else is looked up on a method):

- `forward(hooked, td)`: what `hooked(td)` does while the method is active. A method that
  needs several passes of the model (patching, attribution) writes it with
  `hooked.execute(builder, inputs)`, which compiles (once per program text and input
  signature, see `methods.programs`) and runs a program.
- `OnePassMethod.build(hooked, builder, table, td)`: a method whose work is statements added
  to one pass of the model. It may return a function called with the result after the pass.
  Only such methods can take part in `hooked.run(...)` blocks.
- `hooked_keys(interface)`: the hooked module's `in_keys` and `out_keys`;
  `check(interface)`: refuse keys that cannot work, at `prepare`;
  `enter(hooked)` / `exit(hooked)`: per-context state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from typing import ClassVar

from tensordict import TensorDict, TensorDictBase
from torch import nn

from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.errors import InvalidArgument, MethodUsageError
from tdhook_fx.execution import ExecutionSpec
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.interface import ModelInterface
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult

Finish = Callable[[ProgramResult, TensorDictBase], None]


class HookingContext:
    """A method bound to a model; `with context as hooked:` activates it."""

    def __init__(self, factory: HookingContextFactory, module: nn.Module, in_keys=None, out_keys=None):
        self._factory = factory
        self._hooked = factory._hooked_module_class(
            module, in_keys, out_keys, hooking_context=self, method=factory, **factory._hooked_module_kwargs
        )
        factory.check(self._hooked.interface)
        self._active = False
        self._disabled = False
        self._generate_redirect: GenerateRedirect | None = None

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
            self._factory.enter(self._hooked)
        except BaseException:
            self._active = False
            raise
        self._generate_redirect = GenerateRedirect.install(self)
        return self._hooked

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            self._factory.exit(self._hooked)
        finally:
            self._active = False
            if self._generate_redirect is not None:
                self._generate_redirect.remove()
                self._generate_redirect = None
        return False

    def _on_enter(self) -> None:
        pass

    @contextmanager
    def disable_hooks(self):
        """Inside this block the hooked module runs the plain model (no method)."""
        if not self._active:
            raise MethodUsageError("Cannot disable hooks outside an active context")
        self._disabled = True
        try:
            yield self._hooked
        finally:
            self._disabled = False

    @contextmanager
    def disable(self):
        """Inside this block, the model itself (nothing to restore: it was never changed; its
        `generate` is the plain one too)."""
        if not self._active:
            raise MethodUsageError("Cannot disable a method outside an active context")
        self._disabled = True
        try:
            yield self._hooked.td_module
        finally:
            self._disabled = False


class GenerateRedirect:
    """While a context is active, the model's `generate` is the hooked module's.

    tdhook's hooks stay on the model, so `model.generate(...)` inside a tdhook context generates
    with the method applied. A compiled method never touches the model, so without this the same
    code would generate unintervened text in silence. For the context's duration the model
    instance gets a `generate` attribute (removed on exit) that runs `hooked.generate` with
    Hugging Face's arguments and return types, or raises an error that names `hooked.generate`;
    inside `disable_hooks()` / `disable()` it is the model's own `generate`.
    """

    _ABSENT = object()

    def __init__(self, context: HookingContext, model: nn.Module):
        self._context = context
        self._model = model
        self._previous = model.__dict__.get("generate", self._ABSENT)

    @classmethod
    def install(cls, context: HookingContext) -> GenerateRedirect | None:
        model = context.module.interface.model
        if not callable(getattr(type(model), "generate", None)):
            return None  # not a model that generates
        redirect = cls(context, model)
        model.__dict__["generate"] = redirect
        return redirect

    def __call__(self, *args, **kwargs):
        if self._context.disabled:
            return type(self._model).generate(self._model, *args, **kwargs)
        from tdhook_fx.generation.methods import model_generate

        return model_generate(self._context.module, args, kwargs)

    def remove(self) -> None:
        if self._model.__dict__.get("generate") is self:
            if self._previous is self._ABSENT:
                del self._model.__dict__["generate"]
            else:
                self._model.__dict__["generate"] = self._previous


class HookingContextWithCache(HookingContext):
    """A context with a TensorDict cache, cleared on each enter unless `clear_cache=False`."""

    def __init__(self, factory, module, in_keys=None, out_keys=None, cache: TensorDictBase | None = None, clear_cache: bool = True):
        super().__init__(factory, module, in_keys, out_keys)
        self._cache = TensorDict() if cache is None else cache
        self._clear_cache = clear_cache

    @property
    def cache(self) -> TensorDictBase:
        return self._cache

    def clear(self) -> None:
        """Empty the cache (a locked or memory-mapped one refuses: its entries are preallocated)."""
        if self._cache.is_locked:
            raise InvalidArgument("locked or memory-mapped caches require clear_cache=False")
        self._cache.clear()

    def _on_enter(self) -> None:
        if self._clear_cache:
            self.clear()


class HookingContextFactory(ABC):
    """Base of every method: `prepare(model, in_keys=None, out_keys=None)` -> a `HookingContext`."""

    _hooking_context_class: ClassVar[type[HookingContext]] = HookingContext
    _hooked_module_class: ClassVar[type[HookedModule]] = HookedModule
    single_pass: ClassVar[bool] = False  # True: the method's work is statements of one pass (`build`)

    def __init__(self):
        self._hooking_context_kwargs: dict = {}
        self._hooked_module_kwargs: dict = {}

    def prepare(self, module: nn.Module, in_keys=None, out_keys=None) -> HookingContext:
        """Bind this method to `module`; `in_keys` may be `{kwarg: td_key}` to pass keywords."""
        return self._hooking_context_class(self, module, in_keys, out_keys, **self._hooking_context_kwargs)

    # ---- the protocol -----------------------------------------------------------------------

    def forward(self, hooked: HookedModule, td: TensorDictBase) -> TensorDictBase:
        """What `hooked(td)` does while the method is active (the base, as tdhook's: the model as it is)."""
        return hooked.single_pass(td)

    @property
    def execution_spec(self) -> ExecutionSpec:
        """What a call needs from the model runs (tdhook's `ExecutionSpec`; `Workflow` reads it)."""
        return ExecutionSpec()

    def hooked_keys(self, interface: ModelInterface) -> tuple[list, list]:
        """The hooked module's in_keys and out_keys: what a call reads from and writes to the TensorDict."""
        return list(interface.in_keys), list(interface.out_keys)

    def check(self, interface: ModelInterface) -> None:
        """Refuse, at `prepare`, keys this method cannot work with (raise a TdhookFxError)."""

    def enter(self, hooked: HookedModule) -> None:
        """Called when the context is entered (per-context state: masks, probes, matched modules)."""

    def exit(self, hooked: HookedModule) -> None:
        """Called when the context is left."""


class OnePassMethod(HookingContextFactory):
    """A method whose work is statements added to one compiled pass of the model."""

    single_pass: ClassVar[bool] = True

    @abstractmethod
    def build(self, hooked: HookedModule, builder: ProgramBuilder, table: SiteTable, td: TensorDictBase) -> Finish | None:
        """Add this method's statements for one pass on `td`; may return `finish(result, td)`."""

    def forward(self, hooked: HookedModule, td: TensorDictBase) -> TensorDictBase:
        return hooked.single_pass(td)


class NoMethod(OnePassMethod):
    """The model as it is: what `prepare(model)` binds (for `run()` blocks)."""

    def build(self, hooked, builder, table, td) -> None:
        return None


def prepare(model: nn.Module, in_keys=None, out_keys=None) -> HookingContext:
    """A context around `model` with no method: `with prepare(model) as hooked: hooked.run(td)`."""
    return NoMethod().prepare(model, in_keys, out_keys)


def check_no_overlap(keys, taken, message: str) -> None:
    """Refuse keys that collide with the model's own (e.g. extra keys named like an input)."""
    plain = {k[0] if isinstance(k, tuple) and len(k) == 1 else k for k in taken}
    if any((k[0] if isinstance(k, tuple) and len(k) == 1 else k) in plain for k in keys):
        raise InvalidArgument(message)
