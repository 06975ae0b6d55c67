"""Gradients read after the caller's backward: `save grad` inputs that tell when they are reached.

A `save grad SITE` statement gives each call of the compiled program a zero input whose
gradient is the site's gradient (see `tdhook_fx.compiler.passes.grad`). A tdhook backward hook
fires while the backward runs; here a tensor hook on those zero inputs (our own tensors, not the
model's) does the same: once every gradient a module call's hook would see has arrived, the
reader gets the value (tdhook's `grad_input` / `grad_output` tuples, or a callback's result).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tdhook_fx.methods.paths import ModuleRef
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult
from tdhook_fx.methods.reads import dsl_site, ports
from tdhook_fx.syntax import ast


@dataclass(frozen=True)
class GradRead:
    """The saved gradients of one module call: at its tensor inputs and at its outputs."""

    ref: ModuleRef
    direction: str  # "bwd" (grad_input) or "bwd_pre" (grad_output)
    key: object  # where a cache stores it (a callback is told)
    call: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    callback: Callable | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.input_names + self.output_names

    def value(self, grads: dict):
        """What tdhook's backward hook would hand over: a tuple of gradients, or the callback's result."""
        grad_input = tuple(grads[n] for n in self.input_names)
        grad_output = tuple(grads[n] for n in self.output_names)
        if self.callback is None:
            return grad_input if self.direction == "bwd" else grad_output
        common = {"module": self.ref.module, "key": self.key, "direction": self.direction}
        if self.direction == "bwd":
            return self.callback(grad_input=grad_input, grad_output=grad_output, **common)
        return self.callback(grad_output=grad_output, **common)


def differentiable(table, name: str, kind: str, call: int) -> list:
    """A module call's sites that carry gradients (floating point; token ids have none)."""
    return [s for s in ports(table, name, kind, call) if s.dtype.is_floating_point or s.dtype.is_complex]


def add_grad_read(
    builder: ProgramBuilder, table, ref: ModuleRef, direction: str, call: int, callback: Callable | None, key
) -> GradRead:
    """`save grad` the gradients a `direction` hook on call `call` of `ref` would see (a `bwd`
    callback also gets grad_output, as tdhook's)."""
    inputs = differentiable(table, ref.name, "in", call) if direction == "bwd" else []
    wants_outputs = direction == "bwd_pre" or callback is not None
    outputs = differentiable(table, ref.name, "out", call) if wants_outputs else []

    def save(site) -> str:
        name = builder.name("grad")
        builder.add(ast.Save(dsl_site(table, site), name, grad=True))
        return name

    return GradRead(ref, direction, key, call, tuple(map(save, inputs)), tuple(map(save, outputs)), callback)


def when_reached(result: ProgramResult, read: GradRead, use: Callable) -> None:
    """Call `use(read.value(grads))` each time a backward has computed all of `read`'s gradients.

    Nothing happens when the call ran without gradients (no backward can reach it), as a
    backward hook never fires then.
    """
    deltas = [result.grad_deltas.get(name) for name in read.names]
    if not read.names or any(d is None or not d.requires_grad for d in deltas):
        return
    arrived: dict = {}

    def receive(name: str):
        def hook(grad):
            arrived[name] = grad
            if len(arrived) == len(read.names):
                grads = dict(arrived)
                arrived.clear()
                use(read.value(grads))
            return grad

        return hook

    for name, delta in zip(read.names, deltas):
        delta.register_hook(receive(name))
