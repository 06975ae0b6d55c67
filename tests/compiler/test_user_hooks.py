"""Hooks a user registered on the model are refused: a compiled graph would silently skip them.

Before: a forward hook doubling a layer's output changed the model's result but not the
compiled module's (both front ends inline the modules), with no error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.errors import CaptureError
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.session import HookSession
from tdhook_fx.targets import Target

REGISTER = {
    "forward hook": lambda m: m.register_forward_hook(lambda mod, args, out: out * 2),
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,)),
    "backward hook": lambda m: m.register_full_backward_hook(lambda mod, gin, gout: None),
    "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda mod, gout: None),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("kind", list(REGISTER))
@pytest.mark.parametrize("path", ["2", ""])
def test_a_hook_on_any_module_is_refused_with_its_place_and_the_fix(kind, path, frontend):
    sample = builtin_zoo.mlp()
    handle = REGISTER[kind](sample.model.get_submodule(path))
    with pytest.raises(CaptureError) as raised:
        tdhook_fx.compile(sample.model, "save 0", example=sample.example, frontend=frontend)
    message = str(raised.value)
    assert kind in message
    assert (f"module '{path}' (Linear)" if path else "the model itself (Sequential)") in message
    assert "handle.remove()" in message and "program statement" in message
    handle.remove()
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example, frontend=frontend)
    torch.testing.assert_close(cm(sample.example["input"])["output"], sample.model(sample.example["input"]))


def test_a_global_module_hook_is_refused():
    sample = builtin_zoo.mlp()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        with pytest.raises(CaptureError, match="register_module_forward_hook"):
            tdhook_fx.compile(sample.model, "save 0", example=sample.example)
    finally:
        handle.remove()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_hook_registered_after_compiling_is_refused_at_the_next_call(frontend):
    sample = builtin_zoo.mlp()
    x = sample.example["input"]
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example, frontend=frontend)
    cm(x)
    handle = sample.model[2].register_forward_hook(lambda mod, args, out: out * 2)
    for call in (lambda: cm(x), lambda: cm(sample.example.clone())):
        with pytest.raises(CaptureError, match="module '2'"):
            call()
    handle.remove()
    torch.testing.assert_close(cm(x)["output"], sample.model(x))


def test_the_methods_and_capture_install_nothing_that_trips_it():
    """The capture's own taps, a method's run and a session leave no hook behind, and a compile
    after each still works."""
    sample = builtin_zoo.mlp()
    hooked = HookedModule(sample.model)
    with hooked.run(sample.example.clone()) as run:
        saved = run.save("0")
    saved.resolve()
    with HookSession(sample.model) as session:
        captured = session.capture(Target("0", "activation", -1, (2,)))
        sample.model(sample.example["input"])
    assert captured.values
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in sample.model.modules())
    tdhook_fx.compile(sample.model, "save 2", example=sample.example)
