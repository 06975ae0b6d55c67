"""The site table: every addressable point of a captured model, named, with its example shape."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture.taps import TAP, SiteKey, is_tap
from tdhook_fx.errors import TdhookFxError


@dataclass(frozen=True)
class SiteInfo:
    """One addressable point: an activation (module input/output) or a parameter."""

    name: str  # canonical: "h.0.mlp", "h.0.attn:out.0", "h.0:in.hidden_states", "act@1", "fc.weight"
    module: str  # dotted module name ("" for the root)
    kind: str  # "out" | "in" | "param"
    item: int | str | None = None
    call: int = 0
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    order: int = 0  # position of the value in the captured graph (execution order)
    eager: bool = True  # False: only the traced model has it (e.g. a mask HF builds when traced)

    @property
    def is_activation(self) -> bool:
        return self.kind != "param"

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        traced = ", traced only" if not self.eager else ""
        return f"{self.name} ({self.kind}, {shape}, {str(self.dtype).removeprefix('torch.')}{traced})"


class SiteTable:
    """All sites of one capture on one example, looked up by canonical name or by module."""

    def __init__(self, sites: list[SiteInfo], model: nn.Module):
        self.sites = {s.name: s for s in sites}
        # Held weakly: tables are cached per model, and must not keep the model alive.
        self._model = weakref.ref(model)
        self.by_module: dict[str, list[SiteInfo]] = {}
        for site in sites:
            self.by_module.setdefault(site.module, []).append(site)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Every named module of the model (called or not), "" for the root."""
        model = self._model()
        if model is None:
            raise TdhookFxError("the model these sites belong to no longer exists")
        return dict(model.named_modules())

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name: str) -> SiteInfo:
        return self.sites[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sites

    def activations(self, module: str, call: int, kind: str) -> list[SiteInfo]:
        return [s for s in self.by_module.get(module, []) if s.call == call and s.kind == kind]

    def calls(self, module: str) -> int:
        return 1 + max((s.call for s in self.by_module.get(module, [])), default=-1)

    def parameters(self, module: str) -> list[SiteInfo]:
        return [s for s in self.by_module.get(module, []) if s.kind == "param"]

    def __repr__(self) -> str:
        return "\n".join(s.describe() for s in self)


def build_site_table(
    model: nn.Module, graph_module: fx.GraphModule, inputs: tuple, keys: dict[str, SiteKey], eager: frozenset[str]
) -> SiteTable:
    """Run the tapped graph once on `inputs` and record every site's shape, dtype and order.

    `keys` maps each tap's site name to where it is (as the `Tapper` recorded it); `eager`
    names the sites that the eager model produces too.
    """
    values = _record_taps(graph_module, inputs)
    order = {n.args[1]: i for i, n in enumerate(graph_module.graph.nodes) if is_tap(n)}
    sites = []
    for name, value in values.items():
        key = keys[name]
        sites.append(
            SiteInfo(
                name, key.module, key.kind, key.item, key.call, tuple(value.shape), value.dtype, order[name], name in eager
            )
        )
    for name, parameter in model.named_parameters(remove_duplicate=False):
        module, _, attribute = name.rpartition(".")
        sites.append(SiteInfo(name, module, "param", attribute, 0, tuple(parameter.shape), parameter.dtype, -1))
    return SiteTable(sites, model)


class _TapRecorder(fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.values: dict[str, torch.Tensor] = {}

    def call_function(self, target, args, kwargs):
        if target is TAP:  # record the value; the identity op itself need not run
            self.values[args[1]] = args[0]
            return args[0]
        return super().call_function(target, args, kwargs)


def _record_taps(graph_module: fx.GraphModule, inputs: tuple) -> dict[str, torch.Tensor]:
    recorder = _TapRecorder(graph_module)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values
