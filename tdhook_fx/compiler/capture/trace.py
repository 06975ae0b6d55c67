"""Front end 1: `torch.fx` symbolic tracing.

Fast and shape-agnostic, but only for models whose Python code does not branch on tensor
values or shapes. Module boundaries are tapped by the tracer itself. Built-in torch.nn modules
without children (Linear, Conv2d, BatchNorm2d, ReLU ...) stay whole, as `call_module` nodes
(their forward checks shapes in Python); everything else is traced through.
"""

from __future__ import annotations

import threading

from torch import fx, nn

from tdhook_fx.compiler.capture.call_plan import ModelCall
from tdhook_fx.compiler.capture.taps import Tapper
from tdhook_fx.compiler.graphs import detached


def is_builtin_leaf(module: nn.Module) -> bool:
    """A torch.nn module with no children that returns one tensor (RNNs return tuples)."""
    builtin = type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))
    return builtin and not any(True for _ in module.children()) and not isinstance(module, nn.RNNBase)


class _TappingTracer(fx.Tracer):
    """fx's tracer, tapping module boundaries, and confined to the thread that traces.

    While it traces, fx patches `nn.Module.__call__` and `__getattr__` for the whole process;
    a module called (or a parameter read) in another thread meanwhile comes here too and is
    passed through untouched, so that thread's forward runs as if nothing were traced.
    """

    def __init__(self, tapper: Tapper):
        super().__init__()
        self.tapper = tapper
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_builtin_leaf(m)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        args, kwargs = self.tapper.enter(m, args, kwargs)
        return self.tapper.exit(m, super().call_module(m, forward, args, kwargs))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace(call: ModelCall, tapper: Tapper) -> fx.GraphModule:
    """Symbolically trace `call` (its model's modules tapped); raises whatever fx raises."""
    tracer = _TappingTracer(tapper)
    try:
        graph = tracer.trace(call)
    finally:
        # fx's trace leaves the tracer in a reference cycle (a recursive closure): let it hold nothing
        tracer.__dict__.clear()
    return detached(fx.GraphModule(call, graph))
