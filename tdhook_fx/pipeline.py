"""The pipeline, end to end: parse -> capture -> resolve -> rewrite -> CompiledModule."""

from __future__ import annotations

import time

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.capture import SiteTable, capture, key_name
from tdhook_fx.compiled import CompiledModule
from tdhook_fx.errors import BindingError
from tdhook_fx.passes import rewrite
from tdhook_fx.resolve import resolve
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
    is cached per model and input signature, so compiling another program is quick. The
    model is left unchanged.
    """
    start = time.perf_counter()
    in_keys = list(in_keys or DEFAULT_IN_KEYS)
    out_keys = list(out_keys or DEFAULT_OUT_KEYS)
    text = program if isinstance(program, str) else str(program)
    ast = parse(program, source=source) if isinstance(program, str) else program
    inputs = example_inputs(example, in_keys)
    captured, table = capture(model, inputs, in_keys, out_keys, frontend)
    resolved = resolve(ast, table, text, source)
    compiled = CompiledModule(captured, table, resolved, rewrite(captured, resolved), model.training)
    compiled.example_inputs = inputs
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


def sites(model: nn.Module, *, example, in_keys=None, out_keys=None, frontend: str = "auto") -> SiteTable:
    """Every addressable site of `model` on `example`, by canonical name (with shapes)."""
    in_keys = list(in_keys or DEFAULT_IN_KEYS)
    out_keys = list(out_keys or DEFAULT_OUT_KEYS)
    return capture(model, example_inputs(example, in_keys), in_keys, out_keys, frontend)[1]


def example_inputs(example, in_keys) -> tuple[torch.Tensor, ...]:
    if isinstance(example, TensorDictBase):
        missing = [key_name(k) for k in in_keys if example.get(k, None) is None]
        if missing:
            raise BindingError(
                f"the example TensorDict has no {', '.join(map(repr, missing))}; "
                f"its keys: {sorted(map(key_name, example.keys(include_nested=True, leaves_only=True)))}\n"
                "  hint: pass in_keys=[...] naming the model's inputs (Hugging Face: in_keys=['input_ids'])"
            )
        return tuple(example.get(k) for k in in_keys)
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if len(inputs) != len(in_keys) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise BindingError(f"the example must be a TensorDict or {len(in_keys)} tensor(s), one per in_key")
    return inputs
