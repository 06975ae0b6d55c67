"""tdhook's import path `tdhook.modules`: the hooked module and its `run()` block.

The code lives in `tdhook_fx.methods` (the one method framework); this module keeps tdhook's
names importable where tdhook code looks for them.
"""

from tdhook_fx.methods.context import prepare
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.run import CacheProxy, HookedModuleRun

__all__ = ["CacheProxy", "HookedModule", "HookedModuleRun", "prepare"]
