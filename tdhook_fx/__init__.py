"""tdhook_fx: interventions written in a small DSL, compiled into a rewrite of the model's graph."""

from tdhook_fx.errors import (
    BindingError,
    CaptureError,
    DslSyntaxError,
    ExportError,
    ResolutionError,
    TdhookFxError,
)
from tdhook_fx.syntax.ast import Program
from tdhook_fx.syntax.parse import parse

__all__ = [
    "BindingError",
    "CaptureError",
    "DslSyntaxError",
    "ExportError",
    "Program",
    "ResolutionError",
    "TdhookFxError",
    "parse",
]
