"""Front end 1: `torch.fx` symbolic tracing, through every module (no leaf modules).

Fast and shape-agnostic, but only for models whose Python code does not branch on tensor
values or shapes. Module boundaries are tapped by the tracer itself.
"""

from __future__ import annotations

from torch import fx, nn

from tdhook_fx.capture.adapter import ModelCall
from tdhook_fx.capture.taps import Tapper


class _TappingTracer(fx.Tracer):
    def __init__(self, tapper: Tapper):
        super().__init__()
        self.tapper = tapper

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False

    def call_module(self, m, forward, args, kwargs):
        args, kwargs = self.tapper.enter(m, args, kwargs)
        return self.tapper.exit(m, super().call_module(m, forward, args, kwargs))


def trace(call: ModelCall, tapper: Tapper) -> fx.GraphModule:
    """Symbolically trace `call` (its model's modules tapped); raises whatever fx raises."""
    graph = _TappingTracer(tapper).trace(call)
    return fx.GraphModule(call, graph)
