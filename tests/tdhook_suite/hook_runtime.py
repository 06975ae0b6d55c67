"""tdhook's hook-runtime names for the harness only: importable, failing when used.

tdhook's test files import its hook machinery (`tdhook.runtime.HookProgramBuilder`,
`tdhook.hooks.register_hook_to_module`, ...) at the top, next to the API they test. tdhook_fx
has no hook runtime, by design, so `import` of those files would fail as a whole and hide
every other test in them. Here the names exist and raise `NoHookRuntime` (not a builtin
error, so no `pytest.raises(RuntimeError)` can mistake it for tdhook's behaviour) the moment
a test uses them; each such test is listed in `expectations.BY_DESIGN`. The records a session
keeps (`HookSpec`, `HookProgram`, ...) are tdhook_fx's own.
"""

import types

from tdhook_fx import hooks as fx_hooks
from tdhook_fx.methods import operations

MESSAGE = "tdhook_fx has no hook runtime: every intervention is a compiled program (this test uses tdhook's hooks)"


class NoHookRuntime(Exception):
    pass


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise NoHookRuntime(MESSAGE)


def _unavailable(*args, **kwargs):
    raise NoHookRuntime(MESSAGE)


class EarlyStoppingException(BaseException):
    pass


def runtime_module() -> types.ModuleType:
    module = types.ModuleType("tdhook.runtime", "tdhook's hook runtime: records from tdhook_fx, the rest unavailable")
    for name in ("CaptureSource", "HookSpec", "HookProgram", "TargetOccurrencePlan", "TargetOccurrenceEvidence"):
        setattr(module, name, getattr(operations, name))
    module.HookProgramBuilder = type("HookProgramBuilder", (_Unavailable,), {})
    module.BoundHookProgram = type("BoundHookProgram", (_Unavailable,), {})
    module.temporary_module_state = _unavailable
    return module


def hooks_module() -> types.ModuleType:
    module = types.ModuleType("tdhook.hooks", "tdhook_fx.hooks plus tdhook's hook registration, unavailable")
    for name in dir(fx_hooks):
        if not name.startswith("__"):
            setattr(module, name, getattr(fx_hooks, name))
    for name in ("MultiHookHandle", "MultiHookManager", "HookFactory"):
        setattr(module, name, type(name, (_Unavailable,), {}))
    module.register_hook_to_module = _unavailable
    module.EarlyStoppingException = EarlyStoppingException
    return module
