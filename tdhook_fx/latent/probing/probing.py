r"""Probing: hand each matched module's activation to a probe, after one compiled pass.

`Probing(r"transformer\.h\.\d+\.mlp$", manager.probe_factory, additional_keys=["labels",
"step_type"])` compiles one `save` per matched module that runs; after the pass each probe's
`step(activation, labels=..., step_type=...)` is called in the order the model computed the
activations (the order tdhook's hooks fire in). Probes are made when the context is entered,
one per (module, direction), as tdhook does.
"""

from __future__ import annotations

from collections.abc import Callable

from tensordict.nn import TensorDictModuleBase
from torch import nn

from tdhook_fx.methods.context import HookingContextFactory
from tdhook_fx.methods.paths import match_modules, no_match_error
from tdhook_fx.methods.programs import FORWARD_PORT, MethodUsageError, add_read, require


class Probing(HookingContextFactory):
    """Linear (or any) probes on the activations of the modules matching `key_pattern`."""

    default_classes_to_hook = (nn.Module,)
    default_classes_to_skip = (nn.ModuleList, nn.Sequential, TensorDictModuleBase)

    def __init__(
        self,
        key_pattern: str,
        probe_factory: Callable,
        relative: bool = True,
        directions: list[str] | None = None,
        additional_keys: list | None = None,
        classes_to_hook: list[type[nn.Module]] | None = None,
        classes_to_skip: list[type[nn.Module]] | None = None,
    ):
        super().__init__()
        self.key_pattern = key_pattern
        self._probe_factory = probe_factory
        self._relative = relative
        self._directions = list(directions or ["fwd"])
        for direction in self._directions:
            if direction not in FORWARD_PORT:
                raise MethodUsageError(
                    f"Probing direction {direction!r} needs gradients, which tdhook_fx does not compile yet; "
                    f"use one of {sorted(FORWARD_PORT)}"
                )
        self._additional_keys = list(additional_keys or [])
        self._classes_to_hook = tuple(classes_to_hook or self.default_classes_to_hook)
        self._classes_to_skip = tuple(classes_to_skip or self.default_classes_to_skip)
        self._refs: list = []
        self._probes: dict = {}

    @property
    def additional_in_keys(self) -> list:
        return self._additional_keys

    def _modules(self, hooked):
        interface = hooked.interface
        base = interface.base(self._relative)
        refs = match_modules(
            base, interface.model, self.key_pattern, self._classes_to_hook, self._classes_to_skip
        )
        if not refs:
            raise no_match_error(base, self.key_pattern)
        return refs

    def _enter(self, hooked) -> None:
        self._refs = self._modules(hooked)  # matched once: the model does not change in context
        self._probes = {
            (ref.key, direction): self._probe_factory(ref.key, direction)
            for direction in self._directions
            for ref in self._refs
        }

    def _exit(self, hooked) -> None:
        self._refs, self._probes = [], {}

    def _build(self, hooked, builder, table, td):
        metadata = {}
        for key in self._additional_keys:
            hint = "for probes: td['labels'] = labels and td['step_type'] = 'fit' (or 'predict')"
            name = key if isinstance(key, str) else key[0]
            require(td, name, f"additional_keys names {key!r}", hint)
            metadata[name] = td[name]  # a string (step_type) comes back as a string
        reads = []
        for direction in self._directions:
            for ref in self._refs:
                read = add_read(builder, table, ref.key, ref.name, ref.module, direction)
                if read is not None:
                    reads.append((self._probes[(ref.key, direction)], read))

        def step_probes(result, td) -> None:
            for probe, read in sorted(reads, key=lambda item: item[1].order):
                probe.step(read.value(result.saved), **metadata)

        return step_probes
