"""tdhook's import path `tdhook.contexts`: the method base class and its contexts.

The code lives in `tdhook_fx.methods.context`; this module keeps tdhook's names importable where
tdhook code looks for them.
"""

from tdhook_fx.methods.context import (
    HookingContext,
    HookingContextFactory,
    HookingContextWithCache,
    OnePassMethod,
)

__all__ = ["HookingContext", "HookingContextFactory", "HookingContextWithCache", "OnePassMethod"]
