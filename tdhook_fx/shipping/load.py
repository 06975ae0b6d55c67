"""Safe load of a file written by `cm.save`: JSON and raw tensor bytes, nothing executed.

`tdhook_fx.load(path, model)` checks that `model` is the base model that was saved (same
architecture and, unless `check_weights=False`, the same weights), then compiles the saved
program onto it again and restores the bound values and masks. The model is not changed.

Everything read from the file is checked before it is used: the manifest's JSON is bounded
(16 MiB, nesting) and must have exactly the fields and types cm.save writes (`MANIFEST`, a
hash for every tensor of the base model), the file must hold exactly the tensors the manifest
names with the declared shapes (checked from the header, before any tensor is read), the
example must be small enough to compile on (`save.MAX_EXAMPLE_BATCH`, `MAX_EXAMPLE_ELEMENTS`),
and each pruning mask must have exactly the shape and dtype of the mask it replaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tdhook_fx.compiler.graphs import natural_order
from tdhook_fx.compiler.pipeline import compile as compile_program
from tdhook_fx.errors import ExportError, TdhookFxError
from tdhook_fx.shipping.save import FORMAT, MANIFEST_KEY, example_too_large, fingerprint, safetensors_module
from tdhook_fx.shipping.schema import (
    Invalid,
    const,
    either,
    fixed,
    flag,
    items,
    parse_json,
    record,
    table,
    text,
    whole,
)

_MAX_LISTED = 8  # differences listed when a model does not match
MAX_MANIFEST = 16 << 20  # bytes of the manifest's JSON

_NAME = text(max_length=256, pattern=r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = either(text(max_length=1024), items(text(max_length=1024), 64))  # a TensorDict key: str or tuple
_DTYPE = text(max_length=32, pattern=r"[a-z][a-z0-9_]*")
_PATH = text(max_length=4096)  # a module or tensor name of the model
MANIFEST = record({  # what save.py writes, exactly
    "format": const(FORMAT),
    "versions": record({"tdhook_fx": text(max_length=128), "torch": text(max_length=128)}),
    "program": text(max_length=1 << 20, newlines=True),
    "capture": record({
        "frontend": const("fx", "export"),
        "in_keys": items(_KEY, 1024),
        "out_keys": items(_KEY, 1024),
        "training": flag,
        "example": items(record({"shape": items(whole(0, 1 << 48), 64), "dtype": _DTYPE}), 1024),
        "dynamic_dims": items(items(whole(0, 63), 64), 1024),
    }),
    "bound": table(_NAME, text(max_length=300, pattern=r"bound\.[A-Za-z_][A-Za-z0-9_]*")),
    "functions": items(_NAME, 1024),
    "masks": table(_NAME, text(max_length=300, pattern=r"mask\.[A-Za-z_][A-Za-z0-9_]*")),
    "model": record({
        "class": text(max_length=1024),
        "modules": table(_PATH, text(max_length=1024)),
        "tensors": table(_PATH, fixed(items(whole(0, 1 << 48), 64), _DTYPE)),
        "sha256": table(_PATH, text(max_length=64, pattern=r"[0-9a-f]{64}")),
    }),
})


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a saved file, checked against what cm.save writes (no tensor is read)."""
    return _open(path)[0]


def load(path: str | os.PathLike, model: nn.Module, *, check_weights: bool = True):
    """Compile the program saved at `path` onto `model`, after checking `model` is its base model.

    Refuses (`ExportError`, naming the differences) a model whose classes, tensor names,
    shapes or dtypes differ from the saved one, or (with `check_weights`, the default) whose
    weights differ; `check_weights=False` accepts other weights of the same architecture
    (masks saved for magnitude pruning are then kept as saved). `model` is not changed.
    A file that is not exactly what cm.save writes (another manifest, other tensors, an
    example over `MAX_EXAMPLE_BATCH` rows) is refused before any tensor is read.
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
    """(manifest, tensors): the manifest checked, then the tensors' names, shapes and dtypes, then the tensors."""
    safetensors = safetensors_module()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no such file: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if MANIFEST_KEY not in metadata:
                raise ExportError(
                    f"{path} is a safetensors file but not one written by cm.save (it has no tdhook_fx manifest)"
                )
            manifest = _manifest(metadata[MANIFEST_KEY], path)
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118 (not a dict)
            _check_tensors(manifest, shapes, path)
            tensors = {name: handle.get_tensor(name) for name in shapes} if with_tensors else {}
    except TdhookFxError:
        raise
    except Exception as error:  # safetensors raises its own error type for a malformed file
        raise ExportError(
            f"{path} is not a file written by cm.save (not a safetensors file: {error})\n"
            "  hint: a .pt2 from cm.export loads with tdhook_fx.load_export; tdhook_fx.load reads cm.save's files"
        ) from None
    for i, declared in enumerate(manifest["capture"]["example"]):
        x = tensors.get(f"example.{i}")
        if x is not None and _dtype_name(x.dtype) != declared["dtype"]:
            raise ExportError(f"{path}: example.{i} is {_dtype_name(x.dtype)}, the manifest says {declared['dtype']}")
    return manifest, tensors


def _manifest(raw: str, path) -> dict:
    """The manifest's JSON, bounded, parsed and checked against MANIFEST (located errors)."""
    try:
        manifest = parse_json(raw.encode(), MAX_MANIFEST)
        if isinstance(manifest, dict) and "format" in manifest and manifest["format"] != FORMAT:
            found = manifest["format"]
            raise ExportError(f"{path}: unsupported format {found!r}; this tdhook_fx reads {FORMAT!r}")
        MANIFEST(manifest, "")
    except Invalid as error:
        raise ExportError(
            f"{path}: its tdhook_fx manifest is not what cm.save writes: {error}\n"
            "  hint: the file was changed after cm.save wrote it, or by another program"
        ) from None
    capture = manifest["capture"]
    counts = {len(capture[k]) for k in ("in_keys", "example", "dynamic_dims")}
    if len(counts) != 1:
        raise ExportError(f"{path}: its manifest's capture has different numbers of in_keys, example and dynamic_dims")
    for what, prefix in (("bound", "bound"), ("masks", "mask")):
        for name, key in manifest[what].items():
            if key != f"{prefix}.{name}":
                raise ExportError(
                    f"{path}: its manifest's {what}[{name!r}] names the tensor {key!r}, not '{prefix}.{name}'"
                )
    model = manifest["model"]
    if set(model["sha256"]) != set(model["tensors"]):
        missing = sorted(set(model["tensors"]) - set(model["sha256"]))[:3]
        raise ExportError(
            f"{path}: its manifest's model fingerprint lacks the hash of {missing or 'some tensors'} "
            "(cm.save hashes every tensor of the base model)"
        )
    return manifest


def _check_tensors(manifest: dict, shapes: dict[str, list[int]], path) -> None:
    """The file's tensors are exactly those the manifest names, the example within bounds."""
    example = manifest["capture"]["example"]
    expected = {f"example.{i}" for i in range(len(example))}
    expected |= set(manifest["bound"].values()) | set(manifest["masks"].values())
    if set(shapes) != expected:
        missing, extra = sorted(expected - set(shapes)), sorted(set(shapes) - expected)
        raise ExportError(
            f"{path} is incomplete or holds more than cm.save writes: "
            + (f"it lacks the tensor(s) {', '.join(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"it has the unexpected tensor(s) {', '.join(extra[:5])}" if extra else "")
        )
    for i, declared in enumerate(example):
        if list(shapes[f"example.{i}"]) != declared["shape"]:
            raise ExportError(
                f"{path}: example.{i} has the shape {shapes[f'example.{i}']}, the manifest says {declared['shape']}"
            )
    too_large = example_too_large([declared["shape"] for declared in example])
    if too_large:
        raise ExportError(
            f"{path}: its example has {too_large}; loading compiles the program on it, which runs the model on it\n"
            "  hint: save with a smaller example (cm.save(path, example=td[:8]))"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        for name in given["sha256"]:  # every tensor, in the model's order: the manifest hashes them all
            if saved["sha256"].get(name) != given["sha256"][name]:
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
    for target, key in masks.items():  # exactly: copy_ would broadcast a (16,) or (1,) mask and undo the pruning
        saved, want = tensors[key], current[target]
        if saved.shape != want.shape or saved.dtype != want.dtype:
            raise ExportError(
                f"{path}: the saved mask {key} is {_describe((list(saved.shape), _dtype_name(saved.dtype)))}, "
                f"the program's {target} is {_describe((list(want.shape), _dtype_name(want.dtype)))}"
            )
    with torch.no_grad():
        for target, key in masks.items():
            current[target].copy_(tensors[key])


def _key(key):
    return tuple(key) if isinstance(key, list) else key
