"""Capture: model + example -> a tapped graph and its site table (cached per input signature)."""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture import export as export_frontend
from tdhook_fx.compiler.capture import trace as trace_frontend
from tdhook_fx.compiler.capture.call_plan import CallPlan, join_keys, key_name, model_call, plan_call
from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable, build_site_table
from tdhook_fx.compiler.capture.taps import SiteKey, Tapper
from tdhook_fx.compiler.graphs import mutates
from tdhook_fx.errors import CaptureError

FRONTENDS = ("auto", "fx", "export")


@dataclass(frozen=True)
class Capture:
    """A model turned into a graph whose sites are marked by taps (shared by many programs)."""

    graph_module: fx.GraphModule  # inputs: one per in_key; output: a tuple, one per out_key
    frontend: str  # "fx" or "export"
    plan: CallPlan
    site_keys: dict[str, SiteKey]  # tap name -> where it is
    eager_sites: frozenset[str]  # the sites that the eager model also produces
    seconds: float  # how long capturing took
    site_tables: dict = field(default_factory=dict, compare=False)  # input shapes -> SiteTable

    @cached_property
    def mutates(self) -> bool:
        """Whether the graph changes tensors in place (so a saved value must be copied)."""
        return any(mutates(node, self.graph_module) for node in self.graph_module.graph.nodes)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def capture(
    model: nn.Module, inputs: tuple, in_keys, out_keys, frontend: str = "auto"
) -> tuple[Capture, SiteTable]:
    """Capture `model` called on `inputs` and list its sites with their shapes on `inputs`.

    An earlier capture of the same model and input signature is reused (only the site table,
    one run of the graph, is made anew).
    """
    if frontend not in FRONTENDS:
        raise CaptureError(f"unknown front end {frontend!r}; choose one of {FRONTENDS}")
    signature = (
        tuple(in_keys),
        tuple(out_keys),
        frontend,
        model.training,
        tuple((x.dtype, x.dim()) for x in inputs),
        _structure(model),
    )
    cached = _CACHE.get(model, {}).get(signature)
    shapes = tuple(tuple(x.shape) for x in inputs)
    if cached is not None and shapes in cached.site_tables:  # nothing runs the model: nothing to keep
        return cached, cached.site_tables[shapes]
    with _model_state_kept(model):
        return _cached_capture(model, inputs, in_keys, out_keys, frontend, signature)


def _structure(model: nn.Module) -> tuple:
    """Which module and parameter objects the model is made of: replacing one invalidates a capture."""
    modules = tuple((name, id(module)) for name, module in model.named_modules())
    parameters = tuple((name, id(p)) for name, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, id(b)) for name, b in model.named_buffers())
    return modules + parameters + buffers


@contextmanager
def _model_state_kept(model: nn.Module):
    """Capturing runs the model: keep its buffers (batch-norm statistics) and the RNG unchanged."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng():
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])


def _cached_capture(model, inputs, in_keys, out_keys, frontend, signature):
    per_model = _CACHE.setdefault(model, {})
    shapes = tuple(tuple(x.shape) for x in inputs)
    cached = per_model.get(signature)
    if cached is not None:  # but no site table for these shapes yet
        try:
            return cached, _sites(cached, model, inputs, shapes)
        except Exception:  # an exported graph's shape guards refused these inputs: capture again
            pass
    cached = per_model[signature] = _capture(model, inputs, in_keys, out_keys, frontend)
    return cached, _sites(cached, model, inputs, shapes)


def _sites(capture: Capture, model: nn.Module, inputs: tuple, shapes: tuple) -> SiteTable:
    table = build_site_table(model, capture.graph_module, inputs, capture.site_keys, capture.eager_sites)
    capture.site_tables[shapes] = table
    return table


def _capture(model, inputs, in_keys, out_keys, frontend) -> Capture:
    start = time.perf_counter()
    torch.manual_seed(0)  # the eager run and each front end's check draw the same dropout masks
    with Tapper(model, mark=False).hooks() as eager_tapper:
        plan, eager = plan_call(model, in_keys, out_keys, inputs)
    eager_sites = frozenset(key.name for key in eager_tapper.sites)
    tapper = Tapper(model)
    call = model_call(model, plan, on_enter=tapper.reset)
    failures = []
    for name in ("fx", "export") if frontend == "auto" else (frontend,):
        try:
            graph_module = _run_frontend(name, call, tapper, inputs)
            _check_same_outputs(graph_module, inputs, eager, name)
        except Exception as error:  # every front end's failure is reported, see below
            failures.append((name, error))
            continue
        keys = {key.name: key for key in tapper.sites}
        return Capture(graph_module, name, plan, keys, eager_sites, time.perf_counter() - start)
    raise CaptureError(_failure_message(model, failures))


def _run_frontend(name: str, call, tapper: Tapper, inputs: tuple) -> fx.GraphModule:
    if name == "fx":
        return trace_frontend.trace(call, tapper)
    return export_frontend.export(call, tapper, inputs)


def _check_same_outputs(graph_module, inputs, eager, frontend) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = graph_module(*inputs)
    for got, want in zip(outputs, eager):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise CaptureError(f"the {frontend} graph does not reproduce the model's outputs on the example")


def _failure_message(model, failures) -> str:
    lines = [f"could not capture {type(model).__name__} as a graph:"]
    for name, error in failures:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        lines.append(f"  {name}: {type(error).__name__}: {first}")
    lines.append(
        "  hint: the 'fx' front end needs Python code without branches on tensor values;"
        " 'export' handles those but needs shapes it can reason about. Try the other front end"
        " (frontend='export' or 'fx'), or move data-dependent code out of forward."
    )
    return "\n".join(lines)


__all__ = ["Capture", "SiteInfo", "SiteTable", "capture", "join_keys", "key_name"]
