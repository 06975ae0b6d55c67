"""Compiled step programs: a program rewritten into the decoding-step module's graph, cached.

The step module (`step.step_model`) is captured with the export front end like any model; a
program is resolved against its sites and rewritten by the compiler's own passes, and the result
is a `CompiledModule` like any other (`.code`, `.program`, `.export(...)`, `.compile()`).
`compile_step` takes the `CompiledModule` class from its caller (`type(cm)` in `cm.generate`),
so that the compiled module's own module can call generation without an import cycle.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict

from torch import nn

from tdhook_fx.compiler import variants
from tdhook_fx.compiler.capture import SiteTable, capture
from tdhook_fx.generation.step import OUT_KEYS
from tdhook_fx.syntax import ast

FRONTEND = "export"  # Hugging Face models are not fx-traceable: skip the fx attempt
PER_STEP_MODULE = 64

_COMPILED: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()


def site_table(step: nn.Module, inputs: tuple, keys: tuple) -> SiteTable:
    """The step module's sites on `inputs` (captures and tables are cached by the compiler)."""
    return capture(step, inputs, list(keys), list(OUT_KEYS), FRONTEND)[1]


def compile_step(
    module_class: type,
    step: nn.Module,
    program: ast.Program,
    inputs: tuple,
    keys: tuple,
    *,
    text: str | None = None,
    source: str = "program",
    compiled: bool | dict = False,
    reuse: bool = True,
):
    """`program` compiled into the step module's graph for inputs shaped like `inputs` (cached per
    program text, input signature and mode, unless `reuse=False`: a module of the caller's own);
    with `compiled`, a separate module whose graph runs under `torch.compile` (`compiled` may be
    a dict of `torch.compile` options)."""
    options = dict(compiled) if isinstance(compiled, dict) else {}
    key = (
        str(program), keys, step.training, bool(compiled), tuple(sorted(options.items())),
        tuple((x.dtype, x.device, tuple(x.shape)) for x in inputs),
    )
    entries = _COMPILED.setdefault(step, OrderedDict()) if reuse else OrderedDict()
    if key in entries:
        entries.move_to_end(key)
        return entries[key]
    start = time.perf_counter()
    variant = variants.build(step, program, text, source, inputs, list(keys), list(OUT_KEYS), FRONTEND)
    module = module_class(variant, step, inputs, source=source, hold_model=False)  # cached weakly per step
    module.example_inputs = inputs
    module.compile_seconds = time.perf_counter() - start
    if compiled:
        module.compile(**options)
    entries[key] = module
    if len(entries) > PER_STEP_MODULE:
        entries.popitem(last=False)
    return module
