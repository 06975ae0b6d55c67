r"""Probing: hand each matched module's activation to a probe, after one compiled pass.

`Probing(r"transformer\.h\.\d+\.mlp$", manager.probe_factory, additional_keys=["labels",
"step_type"])` compiles one `save` per matched module that runs; after the pass each probe's
`step(activation, labels=..., step_type=...)` is called in the order the model computed the
activations (the order tdhook's hooks fire in). Probes are made when the context is entered,
one per (module, direction), as tdhook does. In a backward direction (`bwd`, `bwd_pre`) a probe
steps when the caller's backward reaches its module, on tdhook's gradient tuple.
"""

from __future__ import annotations

from collections.abc import Callable

from tensordict.nn import TensorDictModuleBase
from torch import nn

from tdhook_fx.methods.interface import require
from tdhook_fx.methods.reading import ModuleReadingMethod


class Probing(ModuleReadingMethod):
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
        super().__init__(
            key_pattern,
            relative,
            directions,
            tuple(classes_to_hook or self.default_classes_to_hook),
            tuple(classes_to_skip or self.default_classes_to_skip),
        )
        self._probe_factory = probe_factory
        self._additional_keys = list(additional_keys or [])
        self._probes: dict = {}

    def hooked_keys(self, interface) -> tuple[list, list]:
        return list(interface.in_keys) + self._additional_keys, list(interface.out_keys)

    def enter(self, hooked) -> None:
        super().enter(hooked)
        self._probes = {
            (ref.key, direction): self._probe_factory(ref.key, direction)
            for direction in self._directions
            for ref in self._refs
        }

    def exit(self, hooked) -> None:
        super().exit(hooked)
        self._probes = {}

    def before_pass(self, hooked, td) -> dict:
        metadata = {}
        for key in self._additional_keys:
            hint = "for probes: td['labels'] = labels and td['step_type'] = 'fit' (or 'predict')"
            name = key if isinstance(key, str) else key[0]
            require(td, name, f"additional_keys names {key!r}", hint)
            metadata[name] = td[name]  # a string (step_type) comes back as a string
        return metadata

    def consume(self, hooked, values, result, td, metadata) -> None:
        for value in values:
            self._probes[(value.ref.key, value.direction)].step(value.read.value(result.saved), **metadata)

    def consume_gradient(self, hooked, read, value, metadata) -> None:
        """A backward direction: the probe gets tdhook's grad_input / grad_output tuple, when the backward
        reaches the module."""
        self._probes[(read.ref.key, read.direction)].step(value, **metadata)
