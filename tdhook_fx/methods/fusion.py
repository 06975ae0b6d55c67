"""Fused passes: several methods that only read the model, compiled into one program, run once.

tdhook runs each method of a workflow as its own pass of the model. Methods whose whole work is
statements added to a pass and that change nothing the model computes (`ActivationCaching`,
`Probing`, the plain model) can share one: their statements go into one program, compiled once
per input signature, and each method gets the same result (its own saved names), as if it had
run alone. Methods that intervene (steering, patching, pruning, adapters) keep their own pass,
since a later method must see the model without them, as in tdhook.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensordict import TensorDictBase

from tdhook_fx.methods.context import HookingContextFactory, NoMethod, OnePassMethod
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reading import ModuleReadingMethod


def reads_only(method) -> bool:
    """Whether `method` only reads the model in one pass (so it can share a pass with others)."""
    if isinstance(method, (ModuleReadingMethod, NoMethod)):
        return type(method).forward is OnePassMethod.forward
    return isinstance(method, HookingContextFactory) and type(method).forward is HookingContextFactory.forward


@dataclass(frozen=True)
class FusedPass:
    """What one fused pass ran: the methods (by workflow step name) and the program."""

    steps: tuple[str, ...]
    program: str


def run_fused(steps: list[tuple[str, object, HookedModule]], td: TensorDictBase) -> tuple[TensorDictBase, FusedPass]:
    """Run the (entered) hooked modules of read-only `steps` (name, method, module) as one pass on `td`."""
    modules = [module for _, _, module in steps]
    first = modules[0]
    inputs = first.interface.inputs(td)
    table = first.sites(inputs)
    builder = ProgramBuilder()
    finishers = []
    for _, method, module in steps:
        if isinstance(method, OnePassMethod):
            finishers.append(method.build(module, builder, table, td))
    result = first.execute(builder, inputs)
    for module in modules[1:]:
        module.__dict__["_compiled"] = result.compiled  # each one's `.program` / `.code` is the fused pass
    for key, value in (result.outputs or {}).items():
        td.set(key, value)
    for finish in finishers:
        if finish is not None:
            finish(result, td)
    for module in modules:
        td = module.finalize_tensordict(td)
    return td, FusedPass(tuple(name for name, _, _ in steps), result.compiled.program)
