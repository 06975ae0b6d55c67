"""A program compiled for one state of the model, and the check that the model is still in it.

A `CompiledModule` follows its model: the model may be cast (`.half()`, `.to(torch.bfloat16)`),
moved (`.to("cuda")`), switched between training and eval mode, edited in place or given a new
submodule after compiling. Each `Variant` is the program resolved and rewritten on one capture
of the model, with a `guard` (see `capture.state`) that says whether the model is still as that
capture saw it. A call whose guard fails makes (or finds) the variant for the model's state now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture import Capture, SiteTable, capture
from tdhook_fx.compiler.capture.state import Follows, guard
from tdhook_fx.compiler.ir import ResolvedProgram
from tdhook_fx.compiler.passes.rewrite import Rewritten, rewrite
from tdhook_fx.compiler.resolve import resolve
from tdhook_fx.errors import TdhookFxError
from tdhook_fx.syntax.ast import Program


@dataclass
class Variant:
    capture: Capture
    sites: SiteTable
    resolved: ResolvedProgram
    rewritten: Rewritten
    follows: Follows
    guard: Callable[[tuple], bool]  # guard(inputs): the model (and inputs) still fit this variant
    runner: fx.GraphModule | None = field(default=None, repr=False)  # made on first eager call
    static_shapes: bool | None = field(default=None, repr=False)  # outputs' shapes follow the inputs'


def build(
    model: nn.Module, program: Program, text: str, source: str, inputs: tuple, in_keys, out_keys, frontend: str
) -> Variant:
    """Capture `model` (or reuse its capture), resolve and rewrite `program` on it."""
    captured, table = capture(model, inputs, in_keys, out_keys, frontend)
    resolved = resolve(program, table, text, source)
    return assemble(model, captured, table, resolved, rewrite(captured, resolved), inputs)


def assemble(
    model: nn.Module, captured: Capture, table: SiteTable, resolved: ResolvedProgram, rewritten: Rewritten, inputs: tuple
) -> Variant:
    """The variant of a rewrite made by the caller (a rewrite with extra nodes, such as the logit
    lens's readouts: if the model changes, the module's next rewrite is `build`'s, without them,
    and `check_same_interface` refuses it)."""
    follows = captured.follows
    if not follows.tensors and (own_tensors(rewritten.graph_module) or rewritten.grad_names):
        # pruning masks have the dtype and device the weights had; `save grad` inputs the sites' dtypes
        follows = Follows(tensors=True)
    return Variant(captured, table, resolved, rewritten, follows, guard(model, follows, inputs))


def check_same_interface(first: Rewritten, other: Rewritten) -> None:
    """A variant must take and return what the module was compiled to take and return."""
    facts = ("runtime_names", "source_inputs", "returns_model_outputs", "saved_names", "grad_names")
    changed = [name for name in facts if getattr(first, name) != getattr(other, name)]
    if changed:
        raise TdhookFxError(
            "the model changed since this module was compiled, and the program now compiles to a module that "
            f"takes or returns other values ({', '.join(changed)})\n"
            "  hint: compile the program again on the model as it is now"
        )


def carry_tensors(old: fx.GraphModule, new: fx.GraphModule) -> None:
    """Give `new` the tensors the rewrite stored in `old` (pruning masks, computed once when the
    program was compiled, or loaded from a file), cast to the dtype and device `new` made them in."""
    for name, value in own_tensors(old).items():
        fresh = getattr(new, name, None)
        if isinstance(fresh, torch.Tensor):
            setattr(new, name, value.to(fresh.device, fresh.dtype))


def own_tensors(graph_module: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors a rewritten graph holds itself, not read from the model (pruning masks)."""
    found = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and not node.target.startswith("model.") and "." not in node.target:
            value = getattr(graph_module, node.target, None)
            if isinstance(value, torch.Tensor):
                found[node.target] = value
    return found
