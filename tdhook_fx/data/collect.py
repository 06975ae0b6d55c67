"""`collect`: a compiled module (or a method's hooked module) over a dataset, its values to disk.

    cm = tdhook_fx.compile(model, "save transformer.h[*].mlp", example=td, in_keys=["input_ids"], out_keys=["logits"])
    stored = tdhook_fx.collect(cm, loader, "activations/", dtype=torch.bfloat16, mask="attention_mask")
    stored["saved", "transformer.h.0.mlp"]        # (tokens, 64), memory-mapped
    TensorDict.load_memmap("activations/")        # the same, later, in another process

Every batch runs once under `torch.no_grad()`; its saved values (and `outputs`) are appended to
disk as soon as they are computed, so memory holds one batch whatever the size of the data. An
interrupted run continues where it stopped when called again with the same arguments; under
`torchrun` each process takes its share of the batches (see `tdhook_fx.data.stream`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from tdhook_fx.compiler.compiled import SAVED, CompiledModule
from tdhook_fx.data.batches import batch_source
from tdhook_fx.data.rows import Rows
from tdhook_fx.data.stream import stream_to_disk
from tdhook_fx.errors import InvalidArgument, InvalidArgumentType
from tdhook_fx.methods.hooked import HookedModule


def collect(
    module,
    batches,
    path,
    *,
    outputs: Sequence[NestedKey] = (),
    dtype: torch.dtype | None = None,
    mask: NestedKey | None = None,
    flatten: bool = False,
    batch_size: int | None = None,
    device=None,
    progress: bool | None = None,
    overwrite: bool = False,
) -> TensorDictBase:
    """Run `module` over `batches` and write its saved values to a memory-mapped TensorDict at `path`.

    - `module`: a `CompiledModule` (stores every `("saved", name)`), a method's hooked module
      (`ActivationCaching(...).prepare(model)` inside its `with` block: stores what the method
      adds, e.g. `"cache"`), or any module from TensorDict to TensorDict (then name `outputs`).
    - `batches`: a DataLoader (no shuffling), a list of TensorDicts or of dicts of tensors, a
      generator, or a TensorDict of examples or a Hugging Face `datasets.Dataset`, cut into
      `batch_size` examples (default 32).
    - `outputs`: more entries of each result to store: model outputs ("logits") or entries of the
      batch carried along ("labels"); a key naming a sub-TensorDict stores all of it.
    - `dtype`: the storage dtype of floating-point values (e.g. `torch.bfloat16`).
    - `mask`: the batch entry of a (examples, tokens) mask, e.g. "attention_mask": one row per
      token where it is nonzero (padding dropped), with `position` (the token's index in its
      sequence) and `example` (its example's index in the whole data) columns; a per-example
      value (a label) is repeated for each token. `flatten=True` does the same for every token.
    - `device`: where to move each batch first (e.g. "cuda:0"); values are stored from the CPU.
    - `progress`: a tqdm bar (default: when standard error is a terminal).
    - `overwrite`: replace a collection at `path` made with other settings (never anything else).

    Returns the result, memory-mapped; `TensorDict.load_memmap(path)` reads it later, with the
    batch dimension running over all examples (or tokens) in the order of `batches`. Called
    again after an interruption, it continues after the last complete batch; once finished, it
    returns what is on disk. Under `torchrun` every process calls it with the same arguments
    and takes batches rank, rank + world, ...; `path` must be on a file system they all see.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidArgumentType(f"dtype must be a torch.dtype such as torch.bfloat16, not {dtype!r}")
    if not callable(module):
        raise InvalidArgumentType(f"module must be a CompiledModule, a hooked module or a TensorDict module, not {type(module).__name__}")
    keys = list(dict.fromkeys([*_saved_keys(module), *_as_keys(outputs)]))
    if not keys:
        raise InvalidArgument(
            f"{type(module).__name__} saves nothing that collect would store\n"
            "  hint: compile a program with save statements, or name entries to store: outputs=['logits']"
        )
    tokens = flatten or mask is not None
    source = batch_source(batches, batch_size)

    def rows_of(batch: TensorDictBase, number: int) -> Rows:
        if device is not None:
            batch = batch.to(device)
        with torch.no_grad():
            result = module(batch.copy())  # a shallow copy: the caller's batch is left as it was
        rows = Rows.select(result, keys, number)
        if tokens:
            rows = rows.flattened(_mask(result, mask, number) if mask is not None else None, number)
        return rows.stored(dtype)

    settings = {
        "what": "collect",
        "module": _describe(module),
        "keys": _json_keys(keys),
        "dtype": None if dtype is None else str(dtype),
        "mask": list(mask) if isinstance(mask, tuple) else mask,
        "flatten": tokens,
        "batch_size": batch_size,
    }
    return stream_to_disk(source, path, rows_of, settings=settings, overwrite=overwrite, progress=progress)


def _saved_keys(module) -> list:
    """What `module` saves: ("saved",) for a compiled module, the added keys for a method's hooked module."""
    if isinstance(module, CompiledModule):
        return [SAVED] if module.saved_names else []
    if isinstance(module, HookedModule):
        model_keys = set(map(_key_tuple, module.interface.out_keys))
        return [key for key in module.out_keys if _key_tuple(key) not in model_keys]
    return []


def _as_keys(outputs) -> list:
    """A list of keys (a single string key is allowed; nested keys are tuples inside the list)."""
    if isinstance(outputs, str):
        outputs = [outputs]
    return [key if isinstance(key, str) else tuple(key) for key in outputs]


def _key_tuple(key) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


def _mask(result: TensorDictBase, key: NestedKey, number: int) -> torch.Tensor:
    value = result.get(key, None)
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"batch {number} has no mask at {key!r} (mask= names a batch entry such as 'attention_mask')")
    return value


def _describe(module) -> dict:
    """What a rerun must run again to continue a collection (the program, the method, the model)."""
    if isinstance(module, CompiledModule):
        return {"class": "CompiledModule", "program": module.program, "in_keys": _json_keys(module.in_keys), "out_keys": _json_keys(module.out_keys)}
    if isinstance(module, HookedModule):
        method = type(module.method).__qualname__ if module.method is not None else None
        return {"class": "HookedModule", "method": method, "model": type(module.td_module).__qualname__}
    return {"class": type(module).__qualname__}


def _json_keys(keys) -> list:
    return [list(key) if isinstance(key, tuple) else key for key in keys]
