"""A standalone `torch.export` archive (.pt2) of a compiled module.

`cm.export(path)` re-exports the rewritten graph behind a small wrapper whose `forward` takes
the model's inputs only (then any patch sources) and returns plain dicts:
`{out_key: tensor, ..., "saved": {name: tensor}}`. Runtime values are buffers of the
submodule `runtime` (`m.runtime.alpha`), holding the values bound with `cm.bind`: edit them
in the loaded module to change the intervention, no re-export needed. The archive loads with
`torch.export.load` alone: neither tdhook_fx nor the model's library (transformers) is needed.
Archives from others are checked before loading by `tdhook_fx.shipping.audit`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.compiler.capture.call_plan import python_name
from tdhook_fx.compiler.capture.export import dynamic_dims, widen
from tdhook_fx.errors import ExportError

SAVED = "saved"
MANIFEST = "tdhook_fx.json"  # an extra file of the archive: what was exported, as JSON text


# ---- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    """What `cm.export` wrote."""

    path: Path
    input_names: tuple[str, ...]
    runtime_buffers: tuple[str, ...]  # e.g. "runtime.alpha"
    static_dims: tuple[str, ...]  # dynamic dims that torch.export had to fix, in words

    def __str__(self) -> str:
        lines = [f"wrote {self.path}", f"  inputs: {', '.join(self.input_names)}"]
        if self.runtime_buffers:
            lines.append(f"  runtime values (editable buffers): {', '.join(self.runtime_buffers)}")
        lines.extend(f"  note: {note}" for note in self.static_dims)
        return "\n".join(lines)


class Standalone(nn.Module):
    """The rewritten graph behind model inputs only, runtime values as buffers, dicts out."""

    def __init__(self, cm, values: dict[str, torch.Tensor], input_names: tuple[str, ...]):
        super().__init__()
        self.rewritten = cm.graph_module
        self.runtime = nn.Module()
        for name in cm.runtime_names:
            try:
                self.runtime.register_buffer(name, values[name].detach().clone())
            except (KeyError, AttributeError) as error:
                raise ExportError(f"the runtime value ${name} cannot be a buffer name: {error}") from None
        self.runtime_names = tuple(cm.runtime_names)
        self.out_names = tuple(map(key_name, cm.out_keys))
        self.saved_names = tuple(cm.saved_names)
        self.model_inputs = len(cm.in_keys)
        self.input_names = input_names
        self.train(cm.training)

    def run(self, inputs: tuple) -> dict:
        model_inputs, sources = inputs[: self.model_inputs], inputs[self.model_inputs :]
        values = [getattr(self.runtime, name) for name in self.runtime_names]
        flat = self.rewritten(*model_inputs, *values, *sources)
        result = dict(zip(self.out_names, flat))
        if self.saved_names:
            result[SAVED] = dict(zip(self.saved_names, flat[len(self.out_names) :]))
        return result


def standalone_module(cm, input_names: tuple[str, ...]) -> Standalone:
    """A `Standalone` whose `forward` names its arguments (torch.export keeps the names)."""
    values = _bound_tensors(cm)
    params = ", ".join(input_names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.run(({params},))\n", namespace)  # noqa: S102
    cls = type("Standalone", (Standalone,), {"forward": namespace["forward"]})
    return cls(cm, values, input_names)


def export(cm, path: str | os.PathLike, *, example=None) -> ExportSummary:
    """Write `cm` as a standalone `.pt2` (see the module docstring); returns what was written.

    The batch dimension of every input (and the sequence dimension of integer inputs) stays
    dynamic, as in the capture. Refuses (ExportError) a program with bound Python functions
    or unbound runtime values, and an export that does not reproduce `cm`'s outputs.
    """

    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"name the archive *.pt2 (torch.export.load expects it), not {path.name!r}")
    if getattr(cm, "grad_names", ()):
        raise ExportError(
            f"the program saves gradients ({', '.join(cm.grad_names)}), which need a backward pass; "
            "a .pt2 holds the forward computation only\n"
            "  hint: export the program without `save grad`, or ship it with cm.save(path)"
        )
    inputs = cm.example(example)
    # patch sources: the example's inputs in another batch order (own tensors: export must not alias them)
    by_key = dict(zip(map(key_name, cm.in_keys), inputs))
    sources = tuple(by_key[key_name(key)].flip(0).clone() for _, key in cm.patch_inputs)
    names = _input_names(cm)
    module = standalone_module(cm, names)
    arguments = (*inputs, *sources)
    try:
        program = torch.export.export(
            module,
            tuple(widen(x) for x in arguments),
            dynamic_shapes=tuple(dynamic_dims(x) for x in arguments),
            strict=False,
        )
    except Exception as error:  # torch.export's failures are many; report the first line and the place
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(
            f"torch.export could not export the rewritten module: {type(error).__name__}: {first}\n"
            "  hint: a model or program whose computation depends on tensor values may not export; "
            "cm(...) still runs it, and cm.save(path) ships it"
        ) from error
    _check_reproduces(cm, program, arguments)
    program.example_inputs = None  # otherwise torch.export.save pickles them into the archive
    manifest = {
        "program": cm.program,
        "inputs": list(names),
        "in_keys": [key_name(k) for k in cm.in_keys],
        "out_keys": [key_name(k) for k in cm.out_keys],
        "saved": list(cm.saved_names),
        "runtime": {name: f"runtime.{name}" for name in cm.runtime_names},
    }
    try:
        torch.export.save(program, path, extra_files={MANIFEST: json.dumps(manifest)})
    except OSError as error:
        raise ExportError(f"could not write {path}: {error}") from None
    static = _static_dims(program, names, arguments)
    for note in static:
        warnings.warn(f"{path.name}: {note}", stacklevel=3)
    return ExportSummary(path, names, tuple(manifest["runtime"].values()), tuple(static))


def _bound_tensors(cm) -> dict[str, torch.Tensor]:
    bound = cm.bound_values()
    functions = [name for name in cm.runtime_names if callable(bound.get(name))]
    if functions:
        raise ExportError(
            f"the program calls the Python function(s) {', '.join('$' + f for f in functions)}, "
            "which a .pt2 cannot carry (it holds tensors and operators only)\n"
            "  hint: use cm.save(path) (functions are bound again after loading), or write the "
            "function's effect in the DSL"
        )
    missing = [name for name in cm.runtime_names if name not in bound]
    if missing:
        raise ExportError(
            f"no value bound for {', '.join('$' + m for m in missing)}; the .pt2 carries runtime "
            "values as buffers holding the bound values\n"
            f"  hint: cm.bind({missing[0]}=tensor) before exporting (editable in the loaded module)"
        )
    return {name: bound[name] for name in cm.runtime_names}


def _input_names(cm) -> tuple[str, ...]:
    names: list[str] = []
    for key in cm.in_keys:
        names.append(python_name(key_name(key), names))
    by_key = dict(zip(map(key_name, cm.in_keys), names))
    for source, key in cm.patch_inputs:
        names.append(python_name(f"{source}_{by_key[key_name(key)]}", names))
    return tuple(names)


def _check_reproduces(cm, program, arguments: tuple) -> None:
    """Never silently wrong: the exported program must give cm's outputs on the example."""
    model_inputs = arguments[: len(cm.in_keys)]
    sources = arguments[len(cm.in_keys) :]
    with torch.no_grad():
        values = list(_bound_tensors(cm).values())
        want = cm.graph_module(*model_inputs, *values, *sources)
        got = program.module()(*arguments)
    flat_got = [*(got[name] for name in map(key_name, cm.out_keys)), *(got.get(SAVED, {}).values())]
    for name, a, b in zip([*map(key_name, cm.out_keys), *cm.saved_names], want, flat_got):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ExportError(f"the exported program does not reproduce {name!r} on the example; nothing was written")


def _static_dims(program, names: tuple[str, ...], arguments: tuple) -> list[str]:
    """Dims meant to be dynamic that torch.export fixed (e.g. by a per-example runtime value)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    by_name = {n.name: n for n in placeholders}
    notes = []
    for name, placeholder_name, x in zip(names, user_inputs, arguments):
        shape = by_name[placeholder_name].meta["val"].shape
        for dim in dynamic_dims(x):
            if is_concrete_int(shape[dim]):
                what = "batch" if dim == 0 else "sequence"
                notes.append(
                    f"the {what} dimension of {name} is fixed to {shape[dim]} "
                    "(a runtime value or index of that size ties it)"
                )
    return notes


