"""The site table: every addressable point of a captured model, named, with its example shape."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn

from tdhook_fx.compiler.attention import ATTENTION_SITES, attention_values, sdpa_arguments
from tdhook_fx.compiler.capture.internals import InternalOp, internal_ops
from tdhook_fx.compiler.capture.taps import TAP, SiteKey, is_tap
from tdhook_fx.errors import TdhookFxError


@dataclass(frozen=True)
class SiteInfo:
    """One addressable point: an activation (module input/output) or a parameter."""

    name: str  # canonical: "h.0.mlp", "h.0.attn:out.0", "h.0:in.hidden_states", "act@1", "fc.weight", "h.0:add_1"
    module: str  # dotted module name ("" for the root)
    kind: str  # "out" | "in" | "param" | "op" (a value computed inside the module's forward)
    item: int | str | None = None
    call: int = 0
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    order: float = 0  # position of the value in the captured graph (execution order)
    eager: bool = True  # False: only the traced model has it (e.g. a mask HF builds when traced)
    node: str | None = None  # "op": the captured graph's node that computes it
    operation: str = ""  # "op": what computes it ("aten.add.Tensor", "attention pattern")

    @property
    def is_activation(self) -> bool:
        return self.kind != "param"

    @property
    def attention(self) -> str | None:
        """For an attention site (`q`, `k`, `v`, `scores`, `pattern`): which one."""
        if self.kind != "op" or not self.operation.startswith("attention "):
            return None
        return self.operation.removeprefix("attention ")

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        traced = ", traced only" if not self.eager else ""
        kind = self.operation if self.kind == "op" else self.kind
        return f"{self.name} ({kind}, {shape}, {str(self.dtype).removeprefix('torch.')}{traced})"


class SiteTable:
    """All sites of one capture on one example, looked up by canonical name or by module."""

    def __init__(self, sites: list[SiteInfo], model: nn.Module, internal: list[SiteInfo] = ()):
        self.sites = {s.name: s for s in sites}
        # Values inside modules: looked up by name like the others, listed only when asked (`inside`).
        self.internal = {s.name: s for s in internal}
        # Held weakly: tables are cached per model, and must not keep the model alive.
        self._model = weakref.ref(model)
        self.by_module: dict[str, list[SiteInfo]] = {}
        for site in sites:
            self.by_module.setdefault(site.module, []).append(site)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise TdhookFxError("the model these sites belong to no longer exists")
        return model

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Every named module of the model (called or not), "" for the root."""
        return dict(self.model.named_modules())

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name: str) -> SiteInfo:
        return self.sites[name] if name in self.sites else self.internal[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sites or name in self.internal

    def inside(self, module: str, call: int | None = None) -> list[SiteInfo]:
        """The values computed inside `module`'s own forward (every call, or call `call`), in order."""
        return [s for s in self.internal.values() if s.module == module and call in (None, s.call)]

    def activations(self, module: str, call: int, kind: str) -> list[SiteInfo]:
        return [s for s in self.by_module.get(module, []) if s.call == call and s.kind == kind]

    def calls(self, module: str) -> int:
        return 1 + max((s.call for s in self.by_module.get(module, [])), default=-1)

    def parameters(self, module: str) -> list[SiteInfo]:
        return [s for s in self.by_module.get(module, []) if s.kind == "param"]

    def __repr__(self) -> str:
        return "\n".join(s.describe() for s in self)


@dataclass(frozen=True)
class Recording:
    """One run of a tapped graph: its outputs, every tap's value, and the shape and dtype of
    every internal value (the `internals` of the graph)."""

    outputs: tuple
    values: dict[str, torch.Tensor]
    inside: dict[str, tuple]
    internals: list[InternalOp]


def record(graph_module: fx.GraphModule, inputs: tuple, copies: bool = False) -> Recording:
    """Run the tapped graph once on `inputs`, recording what `build_site_table` needs.
    `copies`: each tap's value as it was then, not as later in-place operations left it
    (`nn.ReLU(inplace=True)` after a tapped batch norm), to compare with an eager run."""
    internals = internal_ops(graph_module)
    recorder = _Recorder(graph_module, internals, copies)
    with torch.no_grad():
        outputs = recorder.run(*inputs)
    return Recording(tuple(outputs), recorder.values, recorder.inside, internals)


def build_site_table(
    model: nn.Module, graph_module: fx.GraphModule, keys: dict[str, SiteKey], eager: frozenset[str], recording: Recording
) -> SiteTable:
    """Every site's shape, dtype and order, from a `recording` of the tapped graph on some inputs.

    `keys` maps each tap's site name to where it is (as the `Tapper` recorded it); `eager`
    names the sites that the eager model produces too.
    """
    order = {n.args[1]: i for i, n in enumerate(graph_module.graph.nodes) if is_tap(n)}
    sites = []
    for name, value in recording.values.items():
        key = keys[name]
        sites.append(
            SiteInfo(
                name, key.module, key.kind, key.item, key.call, tuple(value.shape), value.dtype, order[name], name in eager
            )
        )
    for name, parameter in model.named_parameters(remove_duplicate=False):
        module, _, attribute = name.rpartition(".")
        sites.append(SiteInfo(name, module, "param", attribute, 0, tuple(parameter.shape), parameter.dtype, -1))
    return SiteTable(sites, model, _internal_sites(graph_module, recording.internals, recording.inside))


def _internal_sites(graph_module: fx.GraphModule, internals: list[InternalOp], inside: dict) -> list[SiteInfo]:
    """A site per internal value that is one tensor. An attention site sits just before its
    SDPA call (q, k, v, scores, pattern in that order), an operation's value at its node."""
    position = {n.name: i for i, n in enumerate(graph_module.graph.nodes)}
    sites = []
    for op in internals:
        if op.site not in inside:
            continue
        shape, dtype = inside[op.site]
        order = position[op.node]
        if op.attention is not None:
            order -= (len(ATTENTION_SITES) - ATTENTION_SITES.index(op.attention)) / (len(ATTENTION_SITES) + 1)
        sites.append(SiteInfo(op.site, op.module, "op", op.name, op.call, shape, dtype, order, True, op.node, op.operation))
    return sites


class _Recorder(fx.Interpreter):
    """Runs the tapped graph once: every tap's value, and the shape and dtype of every internal value."""

    def __init__(self, module, internals: list[InternalOp], copies: bool = False):
        super().__init__(module)
        self.copies = copies
        self.values: dict[str, torch.Tensor] = {}
        self.inside: dict[str, tuple] = {}  # internal site -> (shape, dtype)
        self.by_node: dict[str, list[InternalOp]] = {}
        for op in internals:
            self.by_node.setdefault(op.node, []).append(op)

    def run_node(self, node):
        result = super().run_node(node)
        for op in self.by_node.get(node.name, ()):
            if op.attention is not None:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                value = attention_values(**sdpa_arguments(args, kwargs))[op.attention]
            else:
                value = result
            if isinstance(value, torch.Tensor):
                self.inside[op.site] = (tuple(value.shape), value.dtype)
        return result

    def call_function(self, target, args, kwargs):
        if target is TAP:  # record the value; the identity op itself need not run
            self.values[args[1]] = args[0].detach().clone() if self.copies else args[0]
            return args[0]
        return super().call_function(target, args, kwargs)


def record_shapes(graph_module: fx.GraphModule, inputs: tuple) -> dict[str, torch.Size]:
    """The shape of every site (inside modules too) when the tapped graph runs on `inputs`."""
    recording = record(graph_module, inputs)
    shapes = {name: torch.Size(value.shape) for name, value in recording.values.items()}
    shapes.update((name, torch.Size(shape)) for name, (shape, _) in recording.inside.items())
    return shapes
