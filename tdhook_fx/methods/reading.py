"""Methods that read the modules whose names match a pattern, in one compiled pass.

`ActivationCaching` and `Probing` share the work: match the modules once per context (tdhook's
`re.match` against dotted names, with class filters), save each matched module's value in each
direction at its last call, and hand the values, in the order the model computed them (the order
tdhook's hooks fire in), to `consume`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.errors import MethodUsageError
from tdhook_fx.methods.context import OnePassMethod
from tdhook_fx.methods.paths import ModuleRef, match_modules, no_match_error
from tdhook_fx.methods.programs import ProgramResult
from tdhook_fx.methods.reads import FORWARD_PORT, Read, add_read


@dataclass(frozen=True)
class ModuleValue:
    """One matched module read in one direction."""

    ref: ModuleRef
    direction: str
    read: Read


class ModuleReadingMethod(OnePassMethod):
    """Read the modules matching `key_pattern` in `directions`, after one pass (see the module doc)."""

    def __init__(
        self,
        key_pattern: str,
        relative: bool = True,
        directions: list[str] | None = None,
        classes_to_hook: tuple = (nn.Module,),
        classes_to_skip: tuple = (),
        callback: Callable | None = None,
    ):
        super().__init__()
        self.key_pattern = key_pattern
        self._relative = relative
        self._directions = list(directions or ["fwd"])
        for direction in self._directions:
            if direction not in FORWARD_PORT:
                raise MethodUsageError(
                    f"{type(self).__name__} direction {direction!r} needs gradients read after your backward, "
                    f"which a pass filled by the forward cannot hold; use one of {sorted(FORWARD_PORT)}"
                )
        self._classes_to_hook = tuple(classes_to_hook)
        self._classes_to_skip = tuple(classes_to_skip)
        self._callback = callback
        self._refs: list[ModuleRef] = []
        self._unmatched: Exception | None = None

    def enter(self, hooked) -> None:
        """Match the modules once (the model's modules do not change inside the context); a pattern
        that matches nothing is reported when the module is called, as tdhook does."""
        interface = hooked.interface
        base = interface.base(self._relative)
        self._refs = match_modules(base, interface.model, self.key_pattern, self._classes_to_hook, self._classes_to_skip)
        self._unmatched = None if self._refs else no_match_error(base, self.key_pattern)

    def exit(self, hooked) -> None:
        self._refs, self._unmatched = [], None

    def read_key(self, ref: ModuleRef, direction: str):
        """The key a callback is told the value is stored under."""
        return ref.key

    def build(self, hooked, builder, table, td):
        if self._unmatched is not None:
            raise self._unmatched
        found = []
        for direction in self._directions:
            for ref in self._refs:
                key = self.read_key(ref, direction)
                read = add_read(builder, table, ref.key, ref.name, ref.module, direction, self._callback, key=key)
                if read is not None:
                    found.append(ModuleValue(ref, direction, read))
        found.sort(key=lambda value: value.read.order)
        state = self.before_pass(hooked, td)

        def finish(result: ProgramResult, td: TensorDictBase) -> None:
            self.consume(hooked, found, result, td, state)

        return finish

    def before_pass(self, hooked, td: TensorDictBase):
        """Checked and taken from `td` before the pass (what `consume` needs besides the values)."""
        return None

    @abstractmethod
    def consume(self, hooked, values: list[ModuleValue], result: ProgramResult, td: TensorDictBase, state) -> None:
        """Use the values read, in the order the model computed them."""
