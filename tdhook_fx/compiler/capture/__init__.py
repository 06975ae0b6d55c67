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
from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable, build_site_table
from tdhook_fx.compiler.capture.state import (
    Follows,
    bakes_tensor_facts,
    called_modules,
    held_objects,
    read_tensors,
    rebind,
    state_key,
)
from tdhook_fx.compiler.capture.taps import SiteKey, Tapper, is_tap
from tdhook_fx.compiler.capture.user_hooks import refuse_user_hooks
from tdhook_fx.compiler.graphs import detached, mutates
from tdhook_fx.compiler.lru import LRU
from tdhook_fx.compiler.sources import generated_code
from tdhook_fx.errors import CaptureError

FRONTENDS = ("auto", "fx", "export")
CAPTURES_PER_MODEL = 8  # captures kept per model (one per state: dtypes, devices, modes, input ranks)
SITE_TABLES_PER_CAPTURE = 8  # site tables kept per capture (one per input shapes)

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
            return cached, _sites(cached, model, inputs, shapes)
        except Exception:  # an exported graph's shape guards refused these inputs: capture again
            pass
    cached = _capture(model, inputs, in_keys, out_keys, frontend)
    per_model.put(key, cached)
    return cached, _sites(cached, model, inputs, shapes)


def _sites(capture: Capture, model: nn.Module, inputs: tuple, shapes: tuple) -> SiteTable:
    table = build_site_table(model, capture.graph_module, inputs, capture.site_keys, capture.eager_sites)
    capture.site_tables.put(shapes, table)
    return table


def _capture(model, inputs, in_keys, out_keys, frontend) -> Capture:
    start = time.perf_counter()
    entry = disk.entry_name(model, inputs, in_keys, out_keys, frontend) if disk.enabled() else None
    with generated_code([]) as keep:  # a stored graph that is not used leaves no source behind
        stored = disk.load(entry, model) if entry is not None else None
        torch.manual_seed(0)  # the eager run and each front end's check draw the same dropout masks
        with Tapper(model, mark=False, record=stored is not None).hooks() as eager_tapper:
            plan, eager = plan_call(model, in_keys, out_keys, inputs)
        eager_sites = frozenset(key.name for key in eager_tapper.sites)
        if stored is not None:
            graph_module, name, keys = stored
            if _reproduces(graph_module, inputs, eager, eager_tapper.values):
                keep.append(graph_module)
                seconds = time.perf_counter() - start
                return Capture(detached(graph_module), name, plan, keys, eager_sites, seconds, held_objects(model))
    failures = []
    for name in ("fx", "export") if frontend == "auto" else (frontend,):
        with generated_code([]) as keep:  # torch.export makes (and drops) dozens of graph modules
            try:
                graph_module, tapper = _run_frontend(name, model, plan, inputs)
                _check_same_outputs(graph_module, inputs, eager, name)
            except Exception as error:  # every front end's failure is reported, see below
                # the reason as text: a kept exception would keep its traceback's frames (and the
                # model in their locals) alive in a reference cycle
                failures.append((name, _reason(error)))
                continue
            keep.append(graph_module)
        keys = {key.name: key for key in tapper.sites}
        if entry is not None:
            disk.save(entry, graph_module, name, keys)
        return Capture(graph_module, name, plan, keys, eager_sites, time.perf_counter() - start, held_objects(model))
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


def _check_same_outputs(graph_module, inputs, eager, frontend) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = graph_module(*inputs)
    for got, want in zip(outputs, eager):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise CaptureError(f"the {frontend} graph does not reproduce the model's outputs on the example")


def _reproduces(graph_module: fx.GraphModule, inputs: tuple, eager: tuple, eager_values: dict) -> bool:
    """Whether a stored graph computes the eager model's outputs, and the value of every site
    the eager model also produces, on the example (a tampered entry that decodes does not)."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if is_tap(node):
                values[node.args[1]] = result
            return result

    torch.manual_seed(0)
    try:
        with torch.no_grad():
            outputs = Recorder(graph_module).run(*inputs)
    except Exception:  # noqa: BLE001 - whatever a wrong graph raises: it is not used
        return False
    pairs = [*zip(outputs, eager), *((values.get(name), value) for name, value in eager_values.items())]
    if len(outputs) != len(eager) or not all(_alike(got, want) for got, want in pairs):
        return False
    # one comparison of everything (a hundred small ones cost seconds on a busy machine)
    got = torch.cat([g.detach().reshape(-1).double() for g, _ in pairs])
    want = torch.cat([w.reshape(-1).double() for _, w in pairs])
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)


def _alike(got, want) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype and got.device == want.device


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
