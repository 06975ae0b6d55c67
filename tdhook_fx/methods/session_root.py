"""The model as a session compiles it: between two identity modules that name the call's tensors.

A `HookSession` routes `model(*args, **kwargs)` to a compiled program; tdhook targets may name
the model itself (`Target("", ...)`), whose "output" and "inputs" are whatever structure the
call has (a tensor, a dict of tuples, keyword arguments). `SessionRoot` makes them sites:

    inputs(*tensor leaves of (args, kwargs))   ->  sites `inputs:out.0`, `inputs:out.1`, ...
    model(*args, **kwargs)                     ->  the model's own sites, under `model.`
    outputs(*tensor leaves of the result)      ->  sites `outputs:out.0`, ...

Every other value of the call (strings, numbers, None) is a constant of the compiled program,
part of its cache key. A model whose forward takes `use_cache` is called with `use_cache=False`
unless the call says otherwise; a result holding other objects (a decoding cache) is refused. One `SessionRoot` is kept per model and argument structure (weakly, with
the model), so the compiler's capture cache serves every later call.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from tdhook_fx.errors import MethodUsageError
from tdhook_fx.methods.interface import ModelInterface
from tdhook_fx.methods.structure import Structure, flatten

INPUTS, MODEL, OUTPUTS = "inputs", "model", "outputs"


class Leaves(nn.Module):
    """An identity on several tensors: marks each as a site (`NAME:out.i`)."""

    def forward(self, *tensors):
        return tensors


class SessionRoot(nn.Module):
    """The model called on one argument structure, its tensors in and out named (see the module doc)."""

    def __init__(self, model: nn.Module, arguments: Structure):
        super().__init__()
        self.inputs = Leaves()
        self.model = model
        self.outputs = Leaves()
        self.__dict__["arguments"] = arguments  # plain attributes: not part of the module tree
        self.__dict__["result"] = None  # the result's Structure, recorded by the first run

    def forward(self, *tensors):
        tensors = self.inputs(*tensors)
        if not self.arguments.leaves:  # a call without tensors gets one unused anchor input
            tensors = ()
        args, kwargs = self.arguments.rebuild(tensors)
        result, leaves = flatten(self.model(*args, **kwargs))
        self.__dict__["result"] = result
        return self.outputs(*leaves)


class RootCall:
    """One call structure of one model: its `SessionRoot` and the interface programs compile against."""

    def __init__(self, root: SessionRoot, outputs: int):
        self.root = root
        inputs = max(1, root.arguments.leaves)
        self.interface = ModelInterface.build(root, [f"leaf_{i}" for i in range(inputs)], [f"out_{i}" for i in range(outputs)])

    @property
    def arguments(self) -> Structure:
        return self.root.arguments

    @property
    def result(self) -> Structure:
        return self.root.result


_ROOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def root_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[RootCall, list]:
    """The `RootCall` for these arguments (made once per structure) and their tensor leaves."""
    if "use_cache" in _parameters(model) and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}  # a compiled call returns tensors, not a decoding cache
    arguments, leaves = flatten((tuple(args), dict(kwargs)))
    if not leaves:
        leaves = [torch.zeros(())]  # the compiled program needs an input; the model ignores this one
    per_model = _ROOTS.setdefault(model, {})
    key = (arguments.signature, model.training)
    call = per_model.get(key)
    if call is None:
        root = SessionRoot(model, arguments)
        for wrapper in (root, root.inputs, root.outputs):  # not root.train(): that would set the model's modules
            wrapper.training = model.training
        with _state_kept(model), torch.no_grad():
            outputs = len(root(*leaves))  # records the result's structure
        if not outputs:
            raise MethodUsageError(f"{type(model).__name__} returned no tensor; a session needs tensor outputs")
        objects = root.result.objects()
        if objects:  # the capture's own objects would come back from every call
            raise MethodUsageError(
                f"{type(model).__name__} returns a {type(objects[0]).__name__}; a compiled call returns tensors in "
                "tuples, lists and dicts (and plain constants)\n"
                "  hint: call the model so that it returns tensors only (e.g. without caches)"
            )
        call = per_model[key] = RootCall(root, outputs)
    return call, leaves


def _parameters(model: nn.Module) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


@contextmanager
def _state_kept(model: nn.Module):
    """Running the model to learn its result's structure changes neither its buffers nor the RNG."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng():
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
