"""tdhook_fx: interventions written in a small DSL, compiled into a rewrite of the model's graph."""

from tdhook_fx.compiler.compiled import CompiledModule
from tdhook_fx.compiler.resolve import match_sites
from tdhook_fx.compiler.pipeline import compile, sites
from tdhook_fx.data.collect import collect
from tdhook_fx.errors import (
    BindingError,
    CaptureError,
    DslSyntaxError,
    ExportError,
    ResolutionError,
    TdhookFxError,
)
from tdhook_fx.latent.logit_lens import compile_logit_lens, logit_lens
from tdhook_fx.perf.sweep import sweep
from tdhook_fx.shipping.audit import inspect_export, load_export
from tdhook_fx.shipping.load import load
from tdhook_fx.syntax.ast import Program
from tdhook_fx.syntax.parse import parse

__all__ = [
    "BindingError",
    "CaptureError",
    "CompiledModule",
    "DslSyntaxError",
    "ExportError",
    "Program",
    "ResolutionError",
    "TdhookFxError",
    "collect",
    "compile",
    "compile_logit_lens",
    "inspect_export",
    "load",
    "load_export",
    "logit_lens",
    "match_sites",
    "parse",
    "sites",
    "sweep",
]
