"""Safe save of a compiled module: the program and its data, never code.

`cm.save(path)` writes one safetensors file: the tensors it needs (the example inputs, the
runtime values bound with `cm.bind`, the pruning masks) and, in the file's text metadata, a
JSON manifest (the program text, the capture settings, and a fingerprint of the base model:
its classes, tensor shapes and dtypes, and a SHA-256 of every tensor). `tdhook_fx.load` reads
it back (`tdhook_fx.shipping.load`); nothing in the file is ever executed or unpickled.

Bound Python functions (`$f(...)`, `patch ... with $f`) are code: they are not saved; the
manifest lists them and the loaded module asks for them (`cm.bind(f=...)`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tdhook_fx.compiler.capture.export import dynamic_dims
from tdhook_fx.errors import ExportError

FORMAT = "tdhook_fx.saved/1"
MANIFEST_KEY = "tdhook_fx"
# Loading compiles the program again on the saved example, which runs the model on it (three
# times): the example is for tracing, a few rows are enough. Files over these bounds are refused.
MAX_EXAMPLE_BATCH = 64
MAX_EXAMPLE_ELEMENTS = 1 << 24


def save(cm, path: str | os.PathLike, *, example=None) -> Path:
    """Write `cm` to `path` (a safetensors file; see the module docstring). Returns the path.

    `example` (the inputs the module was compiled on) is needed only when `cm` does not
    remember them. Loading compiles the program on it again, so it is refused (ExportError)
    over `MAX_EXAMPLE_BATCH` rows or `MAX_EXAMPLE_ELEMENTS` elements: a few rows are enough.
    """
    if tuple(cm.saved_names) != tuple(cm.resolved.saved_names):
        extra = [name for name in cm.saved_names if name not in cm.resolved.saved_names]
        raise ExportError(
            f"this module returns values its program does not describe ({', '.join(extra)}: e.g. a logit lens's "
            "readouts), so a saved program would load back without them\n"
            "  hint: export it instead: cm.export(path) writes the whole rewritten graph (.pt2)"
        )
    safetensors = safetensors_module()
    inputs = cm.example(example)
    too_large = example_too_large([list(x.shape) for x in inputs])
    if too_large:
        raise ExportError(
            f"the example has {too_large}; the file keeps it to compile the program again when loading, "
            "which runs the model on it\n"
            "  hint: a few rows are enough to trace: cm.save(path, example=td[:8])"
        )
    model = cm.base_model
    tensors: dict[str, torch.Tensor] = {}
    for i, x in enumerate(inputs):
        tensors[f"example.{i}"] = x
    bound, functions = {}, []
    for name, value in cm.bound_values().items():
        if callable(value):
            functions.append(name)
        else:
            bound[name] = f"bound.{name}"
            tensors[bound[name]] = value
    masks = {}
    for target, value in cm.graph_tensors().items():
        masks[target] = f"mask.{target}"
        tensors[masks[target]] = value
    if functions:
        warnings.warn(
            f"the bound function(s) {', '.join('$' + f for f in functions)} are code and are not saved; "
            f"after tdhook_fx.load, bind them again: cm.bind({functions[0]}=...)",
            stacklevel=3,
        )
    manifest = {
        "format": FORMAT,
        "versions": {"tdhook_fx": _version("tdhook_fx"), "torch": torch.__version__},
        "program": cm.program,
        "capture": {
            "frontend": cm.frontend,
            "in_keys": list(cm.in_keys),
            "out_keys": cm.captured_out_keys,
            "training": cm.training,
            "example": [{"shape": list(x.shape), "dtype": _dtype_name(x.dtype)} for x in inputs],
            "dynamic_dims": [sorted(dynamic_dims(x)) for x in inputs],
        },
        "bound": bound,
        "functions": functions,
        "masks": masks,
        "model": fingerprint(model),
    }
    path = Path(path)
    contiguous = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    try:
        safetensors.torch.save_file(contiguous, str(path), metadata={MANIFEST_KEY: json.dumps(manifest)})
    except OSError as error:
        raise ExportError(f"could not write {path}: {error}") from None
    return path


def example_too_large(shapes: list[list[int]]) -> str | None:
    """What makes an example bigger than loading it should cost (in words), or None."""
    batch = max((shape[0] for shape in shapes if shape), default=0)
    if batch > MAX_EXAMPLE_BATCH:
        return f"a batch of {batch} (at most {MAX_EXAMPLE_BATCH})"
    elements = sum(math.prod(shape) for shape in shapes)
    if elements > MAX_EXAMPLE_ELEMENTS:
        return f"{elements} elements (at most {MAX_EXAMPLE_ELEMENTS})"
    return None


def fingerprint(model: nn.Module, hashes: bool = True) -> dict:
    """What identifies a base model: its classes, its tensors' shapes and dtypes, their hashes."""
    state = model.state_dict()
    return {
        "class": _class_name(model),
        "modules": {name: _class_name(m) for name, m in model.named_modules()},
        "tensors": {name: [list(t.shape), _dtype_name(t.dtype)] for name, t in state.items()},
        "sha256": {name: tensor_digest(t) for name, t in state.items()} if hashes else {},
    }


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's values (its bytes in row-major order)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def _class_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def safetensors_module():
    """The safetensors package (its torch writer and its lazy reader), or a clear error."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ExportError("saving and loading need the safetensors package: pip install safetensors") from None
    return safetensors
