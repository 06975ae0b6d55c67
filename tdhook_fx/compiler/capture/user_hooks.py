"""Hooks a user registered on the model: refused, because a compiled graph would skip them.

A captured graph inlines the model's modules (an exported graph is aten calls; an fx graph
replays the model's Python code), so a forward hook, a forward pre-hook or a backward hook on
any module would silently not run, and a call would give another result than the model. A
capture refuses a model that has any, naming the module and the kind of hook, and so does a
call of a compiled module once one was registered after compiling (see `capture.state.guard`).
The capture's own taps are registered after this check and removed before anyone else
captures; tdhook_fx's methods and sessions install no hooks.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module

from tdhook_fx.errors import CaptureError

# a module's hook dicts, and the kind of hook each holds (as `register_*` names it)
KINDS = {
    "_forward_pre_hooks": "forward pre-hook (register_forward_pre_hook)",
    "_forward_hooks": "forward hook (register_forward_hook)",
    "_backward_pre_hooks": "backward pre-hook (register_full_backward_pre_hook)",
    "_backward_hooks": "backward hook (register_full_backward_hook / register_backward_hook)",
}
GLOBAL_KINDS = {
    "_global_forward_pre_hooks": "global forward pre-hook (register_module_forward_pre_hook)",
    "_global_forward_hooks": "global forward hook (register_module_forward_hook)",
    "_global_backward_pre_hooks": "global backward pre-hook (register_module_full_backward_pre_hook)",
    "_global_backward_hooks": "global backward hook (register_module_full_backward_hook)",
}


def refuse_user_hooks(model: nn.Module) -> None:
    """Raise `CaptureError` if any module of `model` (or every module, globally) has a hook."""
    for name, module in model.named_modules():
        for attribute, kind in KINDS.items():
            if getattr(module, attribute, None):
                where = f"module '{name}' ({type(module).__name__})" if name else f"the model itself ({type(module).__name__})"
                raise CaptureError(_message(f"{where} has a {kind}"))
    for attribute, kind in GLOBAL_KINDS.items():
        if getattr(torch_module, attribute, None):
            raise CaptureError(_message(f"a {kind} is registered for every module"))


def hook_dicts(module: nn.Module) -> list[dict]:
    """`module`'s hook dicts, which a guard checks are still empty."""
    return [getattr(module, attribute) for attribute in KINDS if isinstance(getattr(module, attribute, None), dict)]


def global_hook_dicts() -> list[dict]:
    """torch's hook dicts for every module, which a guard checks are still empty."""
    return [getattr(torch_module, attribute) for attribute in GLOBAL_KINDS]


def _message(what: str) -> str:
    return (
        f"{what}: a compiled program runs the model as one graph and would not call it, so results "
        "would silently differ from the model's\n"
        "  hint: remove the hook (handle.remove()) before compiling, or write what it does as a "
        "program statement (save / set / steer / patch at that site, or $f(...) with a bound function)"
    )
