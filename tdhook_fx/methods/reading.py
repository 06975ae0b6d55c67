"""Methods that read the modules whose names match a pattern (or one `Target`), in one compiled pass.

`ActivationCaching` and `Probing` share the work: match the modules once per context (tdhook's
`re.match` against dotted names, with class filters), save each matched module's value in each
forward direction at its last call, and hand the values, in the order the model computed them
(the order tdhook's hooks fire in), to `consume`.

Backward directions (`bwd`: the gradients at a module's inputs, tdhook's grad_input; `bwd_pre`:
at its outputs, grad_output) are `save grad` statements. Their values exist only once the
caller runs a backward through the outputs, so each call's zero gradient inputs (see `save grad`)
carry a tensor hook (on those inputs, never on the model): when the backward reaches one module
call, `consume_gradient` gets what tdhook's backward hook would have seen, in the order the
backward computes them (so a cache ends with the module's first call, as tdhook's).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MethodUsageError
from tdhook_fx.methods.context import OnePassMethod
from tdhook_fx.methods.grads import GradRead, add_grad_read, when_reached
from tdhook_fx.methods.paths import ModuleRef, match_modules, no_match_error, refer
from tdhook_fx.methods.programs import ProgramResult
from tdhook_fx.methods.reads import FORWARD_PORT, GRAD_PORT, Read, add_read
from tdhook_fx.methods.targets import selected_read, target_output
from tdhook_fx.targets import Target


@dataclass(frozen=True)
class ModuleValue:
    """One matched module read in one forward direction."""

    ref: ModuleRef
    direction: str
    read: Read


class ModuleReadingMethod(OnePassMethod):
    """Read the modules matching `key_pattern` (a regex, or a `Target`) in `directions`; see the module doc."""

    def __init__(
        self,
        key_pattern: str | Target,
        relative: bool = True,
        directions: list[str] | None = None,
        classes_to_hook: tuple = (nn.Module,),
        classes_to_skip: tuple = (),
        callback: Callable | None = None,
    ):
        super().__init__()
        if not isinstance(key_pattern, (str, Target)):
            raise InvalidArgumentType("key_pattern must be a module pattern or Target")
        self._directions = list(directions or ["fwd"])
        for direction in self._directions:
            if direction not in FORWARD_PORT and direction not in GRAD_PORT:
                raise MethodUsageError(f"Invalid direction: {direction!r}; use one of {[*FORWARD_PORT, *GRAD_PORT]}")
        self._target = key_pattern if isinstance(key_pattern, Target) else None
        if self._target is not None:
            if self._target.kind != "activation":
                raise InvalidArgument(f"{type(self).__name__} requires an activation Target")
            if relative is not True:
                raise InvalidArgument("Target module paths are always relative to the caller-owned model")
            if self._directions != ["fwd"]:
                raise InvalidArgument(f"Target {type(self).__name__} supports only the forward direction")
        self._key_pattern = key_pattern
        self._relative = relative
        self._classes_to_hook = tuple(classes_to_hook)
        self._classes_to_skip = tuple(classes_to_skip)
        self._callback = callback
        self._refs: list[ModuleRef] = []
        self._unmatched: Exception | None = None

    @property
    def key_pattern(self) -> str | Target:
        return self._key_pattern

    @key_pattern.setter
    def key_pattern(self, key_pattern: str) -> None:
        """A new pattern (tdhook lets a method be re-pointed between contexts)."""
        self._key_pattern = key_pattern
        self._target = None

    @property
    def reads_gradients(self) -> bool:
        """Whether a call leaves reads behind that the caller's backward completes (`bwd`, `bwd_pre`)."""
        return any(direction in GRAD_PORT for direction in self._directions)

    def enter(self, hooked) -> None:
        """Match the modules once (the model's modules do not change inside the context); a pattern
        that matches nothing is reported when the module is called, as tdhook does."""
        interface = hooked.interface
        if self._target is not None:
            self._refs = [refer(interface.root, interface.model, self._target.module_path)]
            self._unmatched = None
            return
        base = interface.base(self._relative)
        self._refs = match_modules(base, interface.model, self._key_pattern, self._classes_to_hook, self._classes_to_skip)
        self._unmatched = None if self._refs else no_match_error(base, self._key_pattern)

    def exit(self, hooked) -> None:
        self._refs, self._unmatched = [], None

    def read_key(self, ref: ModuleRef, direction: str):
        """The key a callback is told the value is stored under."""
        return ref.key

    def build(self, hooked, builder, table, td):
        if self._unmatched is not None:
            raise self._unmatched
        found, gradients = [], []
        for direction in self._directions:
            for ref in self._refs:
                key = self.read_key(ref, direction)
                if direction in GRAD_PORT:
                    for call in range(table.calls(ref.name)):
                        gradients.append(add_grad_read(builder, table, ref, direction, call, self._callback, key))
                    continue
                read = self._forward_read(builder, table, ref, direction, key)
                if read is not None:
                    found.append(ModuleValue(ref, direction, read))
        found.sort(key=lambda value: value.read.order)
        state = self.before_pass(hooked, td)

        context = hooked.hooking_context

        def use_gradient(read: GradRead, value) -> None:
            if context is None or context.active:  # after the block, as tdhook's removed hooks: nothing
                self.consume_gradient(hooked, read, value, state)

        def finish(result: ProgramResult, td: TensorDictBase) -> None:
            self.consume(hooked, found, result, td, state)
            for gradient in gradients:
                when_reached(result, gradient, lambda value, g=gradient: use_gradient(g, value))

        return finish

    def _forward_read(self, builder, table, ref: ModuleRef, direction: str, key) -> Read | None:
        target = self._target
        if target is None:
            return add_read(builder, table, ref.key, ref.name, ref.module, direction, self._callback, key=key)
        if self._callback is not None:  # the callback sees the whole output; the selection comes after
            callback = self._callback

            def select(**kwargs):
                return target.select_output(callback(**kwargs))

            return add_read(builder, table, ref.key, ref.name, ref.module, direction, select, key=key)
        calls = table.calls(ref.name)
        if not calls:
            return None
        site, indexed = target_output(builder, table, ref.name, ref.module, target, calls - 1)
        return selected_read(ref.key, ref.module, site, builder.save(indexed))

    def before_pass(self, hooked, td: TensorDictBase):
        """Checked and taken from `td` before the pass (what `consume` needs besides the values)."""
        return None

    @abstractmethod
    def consume(self, hooked, values: list[ModuleValue], result: ProgramResult, td: TensorDictBase, state) -> None:
        """Use the forward values read, in the order the model computed them."""

    @abstractmethod
    def consume_gradient(self, hooked, read: GradRead, value, state) -> None:
        """Use what a backward hook on `read`'s module call would have seen, when the backward reaches it."""

