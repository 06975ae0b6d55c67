"""The pipeline, end to end: parse -> capture -> resolve -> rewrite -> CompiledModule."""

from __future__ import annotations

import time

from torch import nn

from tdhook_fx.compiler import variants
from tdhook_fx.compiler.capture import SiteTable, capture
from tdhook_fx.compiler.capture.call_plan import check_written_keys, example_inputs
from tdhook_fx.compiler.compiled import CompiledModule
from tdhook_fx.syntax.ast import Program
from tdhook_fx.syntax.parse import parse

DEFAULT_IN_KEYS = ["input"]
DEFAULT_OUT_KEYS = ["output"]


def compile(  # noqa: A001 - the public name the project promises
    model: nn.Module,
    program: str | Program,
    *,
    example,
    in_keys=None,
    out_keys=None,
    frontend: str = "auto",
    source: str = "program",
) -> CompiledModule:
    """Compile a DSL `program` into a rewrite of `model`'s graph.

    `example` (a TensorDict holding the in_keys, or the input tensors) is used to capture the
    graph and check the program's sites and shapes. `frontend` is "fx", "export" or "auto"
    (fx when it can trace the model, export otherwise; `cm.frontend` says which). A capture
    is cached per model, model state and input signature, so compiling another program is
    quick. The model is left unchanged; the module follows later changes of it (see
    `CompiledModule`).
    """
    start = time.perf_counter()
    in_keys = list(in_keys or DEFAULT_IN_KEYS)
    out_keys = list(out_keys or DEFAULT_OUT_KEYS)
    text = program if isinstance(program, str) else str(program)
    ast = parse(program, source=source) if isinstance(program, str) else program
    inputs = example_inputs(example, in_keys)
    variant = variants.build(model, ast, text, source, inputs, in_keys, out_keys, frontend)
    check_written_keys(in_keys, out_keys, variant.rewritten.saved_names)
    compiled = CompiledModule(variant, model, inputs, source=source)
    compiled.example_inputs = inputs
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


def sites(model: nn.Module, *, example, in_keys=None, out_keys=None, frontend: str = "auto") -> SiteTable:
    """Every addressable site of `model` on `example`, by canonical name (with shapes)."""
    in_keys = list(in_keys or DEFAULT_IN_KEYS)
    out_keys = list(out_keys or DEFAULT_OUT_KEYS)
    return capture(model, example_inputs(example, in_keys), in_keys, out_keys, frontend)[1]
