"""tdhook's import path `tdhook.modules`: the hooked module, its `run()` block and tdhook's operators.

The code lives in `tdhook_fx.methods` (the one method framework); this module keeps tdhook's
names importable where tdhook code looks for them.
"""

from tdhook_fx.methods.context import prepare
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.operators import (
    FunctionModule,
    IntermediateKeysCleaner,
    ModuleCall,
    ModuleCallWithCache,
    PGDModule,
    flatten_select_reshape_call,
    get_best_device,
)
from tdhook_fx.methods.run import CacheProxy, HookedModuleRun

__all__ = [
    "CacheProxy",
    "FunctionModule",
    "HookedModule",
    "HookedModuleRun",
    "IntermediateKeysCleaner",
    "ModuleCall",
    "ModuleCallWithCache",
    "PGDModule",
    "flatten_select_reshape_call",
    "get_best_device",
    "prepare",
]
