"""Safe load of a file written by `cm.save`: JSON and raw tensor bytes, nothing executed.

`tdhook_fx.load(path, model)` checks that `model` is the base model that was saved (same
architecture and, unless `check_weights=False`, the same weights), then compiles the saved
program onto it again and restores the bound values and masks. The model is not changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from tdhook_fx.compiler.graphs import natural_order
from tdhook_fx.compiler.pipeline import compile as compile_program
from tdhook_fx.errors import ExportError, TdhookFxError
from tdhook_fx.shipping.save import FORMAT, MANIFEST_KEY, fingerprint, safetensors_module

_MAX_LISTED = 8  # differences listed when a model does not match


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a saved file (JSON only: no tensor is read, nothing is executed)."""
    return _open(path)[0]


def load(path: str | os.PathLike, model: nn.Module, *, check_weights: bool = True):
    """Compile the program saved at `path` onto `model`, after checking `model` is its base model.

    Refuses (`ExportError`, naming the differences) a model whose classes, tensor names,
    shapes or dtypes differ from the saved one, or (with `check_weights`, the default) whose
    weights differ; `check_weights=False` accepts other weights of the same architecture
    (masks saved for magnitude pruning are then kept as saved). `model` is not changed.
    """
    manifest, tensors = _open(path, with_tensors=True)
    capture = manifest["capture"]
    _check_model(manifest["model"], model, check_weights, path)
    if model.training != capture["training"]:
        saved, given = ("training", "eval") if capture["training"] else ("eval", "training")
        raise ExportError(
            f"{path}: the program was compiled with the model in {saved} mode; the given model is in {given} mode\n"
            f"  hint: call model.{'train' if capture['training'] else 'eval'}() before loading"
        )
    inputs = tuple(tensors[f"example.{i}"] for i in range(len(capture["example"])))
    in_keys = [_key(k) for k in capture["in_keys"]]
    out_keys = [_key(k) for k in capture["out_keys"]]
    try:
        cm = compile_program(
            model, manifest["program"], example=inputs, in_keys=in_keys, out_keys=out_keys,
            frontend=capture["frontend"], source=Path(path).name,
        )
    except TdhookFxError as error:
        raise ExportError(f"{path}: the saved program no longer compiles onto this model:\n{error}") from None
    cm.bind(**{name: tensors[key] for name, key in manifest["bound"].items()})
    _restore_masks(cm, manifest["masks"], tensors, path)
    return cm


def _open(path, with_tensors: bool = False) -> tuple[dict, dict]:
    safetensors = safetensors_module()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no such file: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except Exception as error:  # safetensors raises its own error type for a malformed header
        raise ExportError(
            f"{path} is not a file written by cm.save (not a safetensors file: {error})\n"
            "  hint: a .pt2 from cm.export loads with tdhook_fx.load_export; tdhook_fx.load reads cm.save's files"
        ) from None
    if MANIFEST_KEY not in metadata:
        raise ExportError(f"{path} is a safetensors file but not one written by cm.save (it has no tdhook_fx manifest)")
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except json.JSONDecodeError as error:
        raise ExportError(f"{path}: its tdhook_fx manifest is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ExportError(f"{path}: unsupported format {found!r}; this tdhook_fx reads {FORMAT!r}")
    missing = [
        key for key in [*manifest["bound"].values(), *manifest["masks"].values()]
        + [f"example.{i}" for i in range(len(manifest["capture"]["example"]))]
        if with_tensors and key not in tensors
    ]
    if missing:
        raise ExportError(f"{path} is incomplete: it lacks the tensor(s) {', '.join(missing)}")
    return manifest, tensors


def _check_model(saved: dict, model: nn.Module, check_weights: bool, path) -> None:
    """Raise an ExportError naming how `model` differs from the saved base model."""
    given = fingerprint(model, hashes=check_weights)
    differences = []
    if saved["class"] != given["class"]:
        differences.append(f"model class: saved {saved['class']}, given {given['class']}")
    unmatched: list[str] = []  # modules only one side has: their contents are not listed again
    for name in sorted(saved["modules"].keys() | given["modules"].keys(), key=natural_order):
        ours, theirs = saved["modules"].get(name), given["modules"].get(name)
        if ours != theirs and name and not _inside(name, unmatched):
            differences.append(_difference("module", name, ours, theirs))
            if ours is None or theirs is None:
                unmatched.append(name)
    for name in sorted(saved["tensors"].keys() | given["tensors"].keys(), key=natural_order):
        ours, theirs = saved["tensors"].get(name), given["tensors"].get(name)
        if ours != theirs and not _inside(name, unmatched):
            differences.append(_difference("tensor", name, _describe(ours), _describe(theirs)))
    architecture_differs = bool(differences)
    if check_weights and not architecture_differs:
        for name, digest in saved["sha256"].items():
            if given["sha256"].get(name) != digest:
                differences.append(f"weights of {name!r} differ from the saved model's")
    if not differences:
        return
    listed = differences[:_MAX_LISTED]
    more = len(differences) - len(listed)
    what = "architecture" if architecture_differs else "weights"
    hint = (
        "load onto the model the program was saved with (same class and configuration)"
        if architecture_differs
        else "load onto the same weights, or pass check_weights=False to apply the program to these weights"
    )
    raise ExportError(
        f"{path}: the given model does not match the saved base model ({what}):\n"
        + "\n".join(f"  - {line}" for line in listed)
        + (f"\n  - ... and {more} more" if more else "")
        + f"\n  hint: {hint}"
    )


def _inside(name: str, modules: list[str]) -> bool:
    return any(name.startswith(module + ".") for module in modules)


def _difference(kind: str, name: str, saved, given) -> str:
    if saved is None:
        return f"{kind} {name!r}: not in the saved model, {given} in the given one"
    if given is None:
        return f"{kind} {name!r}: {saved} in the saved model, missing from the given one"
    return f"{kind} {name!r}: {saved} saved, {given} given"


def _describe(entry) -> str | None:
    if entry is None:
        return None
    shape, dtype = entry
    return f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"


def _restore_masks(cm, masks: dict, tensors: dict, path) -> None:
    current = cm.graph_tensors()
    if set(current) != set(masks):
        raise ExportError(
            f"{path}: the recompiled program has the graph tensors {sorted(current)}, the file {sorted(masks)}; "
            "it was saved by another version of tdhook_fx"
        )
    with torch.no_grad():
        for target, key in masks.items():
            current[target].copy_(tensors[key])


def _key(key):
    return tuple(key) if isinstance(key, list) else key
