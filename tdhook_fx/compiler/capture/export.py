"""Front end 2: `torch.export(strict=False)` with dynamic batch (and sequence) dimensions.

Handles models fx cannot trace (all Hugging Face transformers). Module boundaries are tapped
by temporary forward (pre-)hooks, removed as soon as the export is done.
"""

from __future__ import annotations

import gc

import torch
from torch import fx, nn
from torch.export import Dim

from tdhook_fx.compiler.capture import shape_guards
from tdhook_fx.compiler.capture.call_plan import ModelCall
from tdhook_fx.compiler.capture.taps import Tapper
from tdhook_fx.compiler.graphs import detached

SHAPE_GUARDS = "tdhook_fx_shape_guards"


def dynamic_dims(x: torch.Tensor) -> dict[int, object]:
    """Batch is dynamic; so is the sequence of integer inputs (token ids, masks)."""
    dims = {0: Dim.AUTO} if x.dim() >= 1 else {}
    if x.dim() >= 2 and not x.is_floating_point():
        dims[1] = Dim.AUTO
    return dims


def widen(x: torch.Tensor) -> torch.Tensor:
    """An example with every dynamic dimension at least 2 (export specializes sizes 0 and 1)."""
    for dim in dynamic_dims(x):
        if x.shape[dim] < 2:
            x = torch.cat([x] * 2, dim=dim)
    return x


def export(call: ModelCall, tapper: Tapper, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Export `call` on `inputs` with taps; returns a plain GraphModule (flat inputs/outputs).

    Its `meta[SHAPE_GUARDS]` lists the program's shape guards as data (None where they are not
    all comparisons of input sizes), for the persistent capture cache (`disk`); they are
    checked by `shape_guards.ShapeGuards`."""
    with tapper.hooks():
        program = torch.export.export(
            call,
            tuple(widen(x) for x in inputs),
            dynamic_shapes=tuple(dynamic_dims(x) for x in inputs),
            strict=False,
        )
    unlifted = program.module()
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()  # flat inputs and a flat tuple out, no pytree specs
    graph_module = detached(fx.GraphModule(unlifted, graph))
    guards = shape_guards.guards_of(program, call.plan.arg_names)
    graph_module.meta[SHAPE_GUARDS] = guards
    shape_guards.install(graph_module, guards)
    # torch.export leaves reference cycles behind (the exported program, the module it unlifted,
    # recursive closures of its own holding every parameter): emptied what can be, the rest
    # collected now rather than some time after the model is dropped (a collection takes a few
    # percent of an export's time)
    program.state_dict.clear()
    program.constants.clear()
    empty(unlifted)
    del program, unlifted
    gc.collect()
    return graph_module


def empty(module: nn.Module) -> None:
    """Drop every submodule, parameter, buffer and hook a module tree holds (one made for a
    capture and done with: what still refers to it then holds none of the model's tensors)."""
    for submodule in list(module.modules()):
        for name in ("_modules", "_parameters", "_buffers", *_HOOK_DICTS):
            getattr(submodule, name, {}).clear()


def shadow(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree made of new module objects holding the same parameters,
    buffers and attributes (nothing is copied but the containers).

    `torch.export(strict=False)` replaces the traced modules' parameters and buffers by fake
    tensors while it traces; on a shadow that leaves the model's own modules untouched, so
    another thread can run the model meanwhile. Shared submodules stay shared.
    """
    copies: dict[int, nn.Module] = {}
    for module in model.modules():  # new objects, their containers filled below
        clone = object.__new__(type(module))
        state = dict(module.__dict__)
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", *_HOOK_DICTS):
            if name in state:
                state[name] = type(state[name])(state[name])
        clone.__dict__.update(state)
        copies[id(module)] = clone
    for module in model.modules():
        copies[id(module)]._modules = {
            name: None if child is None else copies[id(child)] for name, child in module._modules.items()
        }
    return copies[id(model)]


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
