"""The same four interventions done by each peer: tdhook_fx (tensor and TensorDict calls), raw
torch hooks, tdhook 0.3.0 and nnsight 0.8.

`prepare(peer, workload, operation)` returns a `Prepared`: `call()` runs one intervened
forward (hooks are installed once, beforehand, as a user would keep them for many calls) and
`result(value)` picks the model output and the saved value of the workload's layer out of
what `call` returned, so that every peer is checked against `tdhook_fx.reference` before it
is timed. A peer that is not installed is skipped with the reason (`unavailable`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.workloads import Workload

PEERS = ("tdhook_fx", "tdhook_fx_td", "raw_hooks", "tdhook", "nnsight")
LABELS = {
    "tdhook_fx": "tdhook_fx (tensors)",
    "tdhook_fx_td": "tdhook_fx (TensorDict)",
    "raw_hooks": "raw torch hooks",
    "tdhook": "tdhook 0.3.0",
    "nnsight": "nnsight 0.8",
}


@dataclass
class Prepared:
    call: Callable[[], object]
    result: Callable[[object], dict]  # -> {"output": tensor, "saved": tensor or None}
    close: Callable[[], None] = field(default=lambda: None)


def unavailable(peer: str) -> str | None:
    """Why a peer cannot run here (None: it can)."""
    module = {"tdhook": "tdhook", "nnsight": "nnsight"}.get(peer)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # noqa: BLE001 - not installed, or broken with this torch: skipped
        return f"{module} not importable ({type(error).__name__}: {error})"
    return None


def prepare(peer: str, workload: Workload, operation: str) -> Prepared:
    """A peer's intervened call; hook-based peers get a private copy of the model."""
    if peer in ("raw_hooks", "tdhook", "nnsight"):
        workload = workload.private_copy()
    return _BUILDERS[peer](workload, operation)


# ---- tdhook_fx --------------------------------------------------------------------------------


def _tdhook_fx(workload: Workload, operation: str) -> Prepared:
    compiled = workload.compile(operation)
    inputs, source = workload.inputs, workload.source
    key = workload.out_keys[0]
    if operation == "patch":
        call = lambda: compiled(*inputs, patched=source)
    else:
        call = lambda: compiled(*inputs)
    return Prepared(call, lambda out: {"output": out[key], "saved": out.get("saved", {}).get(workload.layer)})


def _tdhook_fx_td(workload: Workload, operation: str) -> Prepared:
    compiled = workload.compile(operation)
    td = workload.td.copy()
    key = workload.out_keys[0]
    return Prepared(
        lambda: compiled(td), lambda out: {"output": out[key], "saved": out.get(("saved", workload.layer), None)}
    )


# ---- raw torch hooks ----------------------------------------------------------------------------


def _raw_hooks(workload: Workload, operation: str) -> Prepared:
    forward = workload.plain()
    layer = workload.model.get_submodule(workload.layer)
    handles = []
    saved: dict = {}
    if operation == "save-all":
        for name in workload.save_sites:
            handles.append(workload.model.get_submodule(name).register_forward_hook(_saver(saved, name)))
    elif operation == "steer":
        vector = workload.vector
        handles.append(layer.register_forward_hook(lambda m, args, output: output + vector))
    elif operation == "set":
        handles.append(layer.register_forward_hook(_set_position_zero))
    else:  # patch: one run on the source records the value, the next one puts it in
        state = {"replace": False}

        def patch(module, args, output):
            if state["replace"]:
                return state["value"]
            state["value"] = output
            return None

        handles.append(layer.register_forward_hook(patch))
        source_forward = workload.forward_on(workload.source)

        def forward_patched():
            state["replace"] = False
            source_forward()
            state["replace"] = True
            return forward()

        return Prepared(forward_patched, lambda out: _plain_result(workload, out, None), lambda: _remove(handles))

    def call():
        saved.clear()
        return forward(), dict(saved)

    return Prepared(call, lambda out: _plain_result(workload, out[0], out[1].get(workload.layer)), lambda: _remove(handles))


def _saver(saved: dict, name: str):
    def hook(module, args, output):
        saved[name] = output

    return hook


def _set_position_zero(module, args, output):
    output = output.clone()
    output[:, 0] = 0
    return output


def _plain_result(workload: Workload, output, saved) -> dict:
    if workload.name == "gpt2":
        output = output.logits
    return {"output": output, "saved": saved}


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()


# ---- tdhook 0.3.0 -------------------------------------------------------------------------------


def _tdhook(workload: Workload, operation: str) -> Prepared:
    from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors

    key = workload.out_keys[0]
    td = workload.td.copy()
    if operation == "save-all":
        pattern = "^(" + "|".join(re.escape(n) for n in workload.save_sites) + ")$"
        method = ActivationCaching(pattern)
        result = lambda out: {"output": out[key], "saved": out.get(("cache", workload.layer), None)}
    elif operation == "steer":
        vector = workload.vector
        method = SteeringVectors([workload.layer], steer_fn=lambda module_key, output: output + vector)
        result = lambda out: {"output": out[key], "saved": None}
    elif operation == "set":
        method = SteeringVectors([workload.layer], steer_fn=lambda module_key, output: _set_position_zero(None, (), output))
        result = lambda out: {"output": out[key], "saved": None}
    else:
        # tdhook's ActivationPatching runs the model on ("patched", in_key) with the layer's value
        # taken from the run on in_key: so the source goes at in_key and the target at "patched".
        method = ActivationPatching([workload.layer])
        for k in workload.in_keys:
            td[k], td["patched", k] = workload.td["patched", k], workload.td[k]
        result = lambda out: {"output": out["patched", key], "saved": None}
    stack = contextlib.ExitStack()
    hooked = stack.enter_context(method.prepare(workload.model, in_keys=workload.in_keys, out_keys=workload.out_keys))
    return Prepared(lambda: hooked(td), result, stack.close)


# ---- nnsight 0.8 --------------------------------------------------------------------------------


def _nnsight(workload: Workload, operation: str) -> Prepared:
    import nnsight
    from nnsight import NNsight

    wrapped = NNsight(workload.model)
    inputs, source = workload.inputs, workload.source
    layer = _envoy(wrapped, workload.layer)
    is_gpt2 = workload.name == "gpt2"
    vector = workload.vector

    if operation == "save-all":
        envoys = [_envoy(wrapped, name) for name in workload.save_sites]
        at = workload.save_sites.index(workload.layer)

        def call():
            with wrapped.trace(*inputs):
                saved = nnsight.save([envoy.output for envoy in envoys])
                output = wrapped.output.save()
            return output, saved[at]

    elif operation == "steer":

        def call():
            with wrapped.trace(*inputs):
                layer.output = layer.output + vector
                output = wrapped.output.save()
            return output, None

    elif operation == "set":

        def call():
            with wrapped.trace(*inputs):
                layer.output[:, 0] = 0
                output = wrapped.output.save()
            return output, None

    else:

        def call():
            with wrapped.trace(*source):
                value = layer.output.save()
            with wrapped.trace(*inputs):
                layer.output = value
                output = wrapped.output.save()
            return output, None

    return Prepared(call, lambda out: {"output": out[0].logits if is_gpt2 else out[0], "saved": out[1]})


def _envoy(wrapped, name: str):
    envoy = wrapped
    for part in name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


_BUILDERS = {
    "tdhook_fx": _tdhook_fx,
    "tdhook_fx_td": _tdhook_fx_td,
    "raw_hooks": _raw_hooks,
    "tdhook": _tdhook,
    "nnsight": _nnsight,
}


def check(workload: Workload, operation: str, prepared: Prepared, want: dict) -> str | None:
    """None if the peer's result equals the reference, else what differs."""
    with torch.no_grad():
        got = prepared.result(prepared.call())
    key = workload.out_keys[0]
    if not torch.allclose(got["output"], want[key], rtol=1e-4, atol=1e-4):
        return "output differs from the reference"
    if operation == "save-all":
        saved = got["saved"]
        if saved is None or not torch.allclose(saved, want[("saved", workload.layer)], rtol=1e-4, atol=1e-4):
            return f"saved {workload.layer} differs from the reference"
    return None
