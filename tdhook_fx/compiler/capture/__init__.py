"""Capture: model + example -> a tapped graph and its site table (cached per input signature)."""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture import disk
from tdhook_fx.compiler.capture import export as export_frontend
from tdhook_fx.compiler.capture import trace as trace_frontend
from tdhook_fx.compiler.capture.call_plan import CallPlan, join_keys, key_name, model_call, plan_call
from tdhook_fx.compiler.capture.fingerprint import entry_name
from tdhook_fx.compiler.capture.sites import Recording, SiteInfo, SiteTable, build_site_table, record
from tdhook_fx.compiler.capture.state import (
    Follows,
    bakes_tensor_facts,
    called_modules,
    held_objects,
    read_tensors,
    rebind,
    state_key,
)
from tdhook_fx.compiler.capture.taps import SiteKey, Tapper
from tdhook_fx.compiler.capture.user_hooks import refuse_user_hooks
from tdhook_fx.compiler.graphs import detached, mutates
from tdhook_fx.compiler.lru import LRU
from tdhook_fx.compiler.sources import generated_code
from tdhook_fx.errors import CaptureError

FRONTENDS = ("auto", "fx", "export")
CAPTURES_PER_MODEL = 8  # captures kept per model (one per state: dtypes, devices, modes, input ranks)
SITE_TABLES_PER_CAPTURE = 8  # site tables kept per capture (one per input shapes)
RTOL, ATOL = 1e-4, 1e-5  # a captured graph's values against the eager model's

# Captures run one at a time in the process: torch.fx's tracer patches `nn.Module.__call__` and
# `__getattr__` for everyone while it runs, and two overlapping traces would restore each
# other's patches (leaving `__call__` patched for good). Reentrant: a capture may compile.
CAPTURE_LOCK = threading.RLock()


@dataclass(frozen=True)
class Capture:
    """A model turned into a graph whose sites are marked by taps (shared by many programs)."""

    graph_module: fx.GraphModule  # inputs: one per in_key; output: a tuple, one per out_key
    frontend: str  # "fx" or "export"
    plan: CallPlan
    site_keys: dict[str, SiteKey]  # tap name -> where it is
    eager_sites: frozenset[str]  # the sites that the eager model also produces
    seconds: float  # how long capturing took
    held: tuple = field(default=(), compare=False, repr=False)  # the objects the cache key names by id
    site_tables: LRU = field(default_factory=lambda: LRU(SITE_TABLES_PER_CAPTURE), compare=False)  # shapes -> table

    @cached_property
    def mutates(self) -> bool:
        """Whether the graph changes tensors in place (so a saved value must be copied)."""
        return any(mutates(node, self.graph_module) for node in self.graph_module.graph.nodes)

    @cached_property
    def follows(self) -> Follows:
        """What the graph follows by itself when the model changes (see `state.Follows`)."""
        nodes = self.graph_module.graph.nodes
        own_constants = any(n.op == "get_attr" and not n.target.startswith("model.") for n in nodes)
        if self.frontend == "fx" and not own_constants and not bakes_tensor_facts(nodes):
            return Follows(tensors=False, read=read_tensors(self.graph_module), live_modes=called_modules(self.graph_module))
        return Follows(tensors=True)


# model -> LRU of captures by state key; weak, so a model nobody uses is freed with its captures
_CACHE: "weakref.WeakKeyDictionary[nn.Module, LRU]" = weakref.WeakKeyDictionary()


def capture(
    model: nn.Module, inputs: tuple, in_keys, out_keys, frontend: str = "auto"
) -> tuple[Capture, SiteTable]:
    """Capture `model` called on `inputs` and list its sites with their shapes on `inputs`.

    An earlier capture of the same model, in the same state (module objects, modes, parameters
    and buffers with their dtypes, devices and shapes; see `state.state_key`) and for inputs of
    the same dtypes, devices and ranks is reused (only the site table, one run of the graph, is
    made anew), reading the model's tensors of now. A model with hooks of its user on any module
    is refused (`user_hooks`): the graph would not run them.
    Thread-safe: captures are serialized (`CAPTURE_LOCK`).
    """
    if frontend not in FRONTENDS:
        raise CaptureError(f"unknown front end {frontend!r}; choose one of {FRONTENDS}")
    with CAPTURE_LOCK:
        refuse_user_hooks(model)  # a graph would not run them
        key = (tuple(in_keys), tuple(out_keys), frontend, state_key(model, inputs))
        per_model = _CACHE.get(model)
        if per_model is None:
            per_model = _CACHE[model] = LRU(CAPTURES_PER_MODEL)
        cached = per_model.get(key)
        if cached is not None:
            rebind(cached.graph_module, model)  # a buffer replaced by `.to()` and back, say
        shapes = tuple(tuple(x.shape) for x in inputs)
        table = cached.site_tables.get(shapes) if cached is not None else None
        if table is not None:  # nothing runs the model: nothing to keep
            return cached, table
        with _model_state_kept(model):
            return _cached_capture(model, inputs, in_keys, out_keys, frontend, key, per_model)


@contextmanager
def _model_state_kept(model: nn.Module):
    """Capturing runs the model: keep its buffers (batch-norm statistics) and the RNG unchanged."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices whose RNG a capture of `model` may draw from (fork_rng restores them)."""
    return sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})


def _cached_capture(model, inputs, in_keys, out_keys, frontend, key, per_model: LRU):
    shapes = tuple(tuple(x.shape) for x in inputs)
    cached = per_model.get(key)
    if cached is not None:  # but no site table for these shapes yet
        try:
            return cached, _table(cached, model, shapes, record(cached.graph_module, inputs))
        except Exception:  # an exported graph's shape guards refused these inputs: capture again
            pass
    cached, recording = _capture(model, inputs, in_keys, out_keys, frontend)
    per_model.put(key, cached)
    return cached, _table(cached, model, shapes, recording)


def _table(capture: Capture, model: nn.Module, shapes: tuple, recording: Recording) -> SiteTable:
    table = build_site_table(model, capture.graph_module, capture.site_keys, capture.eager_sites, recording)
    capture.site_tables.put(shapes, table)
    return table


def _capture(model, inputs, in_keys, out_keys, frontend) -> tuple[Capture, Recording]:
    """A capture of `model` on `inputs`, and the run of its graph that checked it (the site
    table is built from that run): read from the persistent capture cache when an entry there
    reproduces the eager model, else made by the front ends (and stored)."""
    start = time.perf_counter()
    entry = entry_name(model, inputs, in_keys, out_keys, frontend) if disk.enabled() else None
    with generated_code([]) as keep:  # a stored graph that is not used leaves no source behind
        stored = disk.load(entry, model) if entry is not None else None
        torch.manual_seed(0)  # the eager run and each check draw the same dropout masks
        with Tapper(model, mark=False, record=stored is not None).hooks() as eager_tapper:
            plan, eager = plan_call(model, in_keys, out_keys, inputs)
        eager_sites = frozenset(key.name for key in eager_tapper.sites)
        if stored is not None:
            graph_module, name, keys = stored
            try:  # the entry must compute the eager model's outputs and every site it also produces
                recording = _checked_run(graph_module, inputs, eager, eager_tapper.values, "stored")
            except Exception:  # noqa: BLE001, S110 - whatever a wrong graph raises: it is not used
                pass
            else:
                keep.append(graph_module)
                seconds = time.perf_counter() - start
                return Capture(detached(graph_module), name, plan, keys, eager_sites, seconds, held_objects(model)), recording
    failures = []
    for name in ("fx", "export") if frontend == "auto" else (frontend,):
        with generated_code([]) as keep:  # torch.export makes (and drops) dozens of graph modules
            try:
                graph_module, tapper = _run_frontend(name, model, plan, inputs)
                recording = _checked_run(graph_module, inputs, eager, {}, name)
            except Exception as error:  # every front end's failure is reported, see below
                # the reason as text: a kept exception would keep its traceback's frames (and the
                # model in their locals) alive in a reference cycle
                failures.append((name, _reason(error)))
                continue
            keep.append(graph_module)
        keys = {key.name: key for key in tapper.sites}
        if entry is not None:
            disk.save(entry, graph_module, name, keys)
        seconds = time.perf_counter() - start
        return Capture(graph_module, name, plan, keys, eager_sites, seconds, held_objects(model)), recording
    raise CaptureError(_failure_message(model, failures))


def _run_frontend(name: str, model: nn.Module, plan: CallPlan, inputs: tuple) -> tuple[fx.GraphModule, Tapper]:
    """The front end's tapped graph of `model` called by `plan`, and the tapper that marked it.

    torch.export swaps the parameters of the modules it traces for fake tensors while it runs:
    it traces a shadow of the model (`export.shadow`: new module objects, the same tensors), so
    that the model itself stays usable meanwhile (a forward in another thread)."""
    traced = model if name == "fx" else export_frontend.shadow(model)
    tapper = Tapper(traced)
    call = model_call(traced, plan, on_enter=tapper.reset)
    try:
        if name == "fx":
            return trace_frontend.trace(call, tapper), tapper
        return export_frontend.export(call, tapper, inputs), tapper
    finally:  # what the front end's own reference cycles may still hold: none of the model's tensors
        tapper.names.clear()
        call._modules.clear()
        if traced is not model:
            export_frontend.empty(traced)


def _checked_run(graph_module, inputs: tuple, eager: tuple, eager_values: dict, which: str) -> Recording:
    """One recorded run of a captured graph on the example, checked against the eager model:
    its outputs, and the value of each site in `eager_values` (site name -> eager value)."""
    torch.manual_seed(0)
    in_place = bool(eager_values) and any(mutates(node, graph_module) for node in graph_module.graph.nodes)
    recording = record(graph_module, inputs, copies=in_place)  # eager values are copies taken then
    got = [*recording.outputs, *(recording.values.get(name) for name in eager_values)]
    if len(recording.outputs) != len(eager) or not _all_close(got, [*eager, *eager_values.values()]):
        raise CaptureError(f"the {which} graph does not reproduce the model's outputs on the example")
    return recording


def _all_close(got: list, want: list) -> bool:
    """Whether each pair is alike and equal within the capture's tolerance (NaN equals NaN).
    A few plain tensor operations per pair: a capture compares a hundred sites, and the
    double-precision `allclose` of them all took seconds."""
    for g, w in zip(got, want, strict=True):
        if not (isinstance(g, torch.Tensor) and g.shape == w.shape and g.dtype == w.dtype and g.device == w.device):
            return False
        if g.is_floating_point() or g.is_complex():
            difference = (g - w).abs()
            near = (difference <= w.abs() * RTOL + ATOL) & difference.isfinite()
            if not near.all() and not torch.isclose(g, w, rtol=RTOL, atol=ATOL, equal_nan=True).all():
                return False  # (isclose, slower, tells infinities and NaNs apart)
        elif not torch.equal(g, w):
            return False
    return True


def _reason(error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {first}"


def _failure_message(model, failures) -> str:
    lines = [f"could not capture {type(model).__name__} as a graph:"]
    for name, reason in failures:
        lines.append(f"  {name}: {reason}")
    lines.append(
        "  hint: the 'fx' front end needs Python code without branches on tensor values;"
        " 'export' handles those but needs shapes it can reason about. Try the other front end"
        " (frontend='export' or 'fx'), or move data-dependent code out of forward."
    )
    return "\n".join(lines)


__all__ = ["Capture", "SiteInfo", "SiteTable", "capture", "join_keys", "key_name"]
