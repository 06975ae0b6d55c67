"""What one row of a collection holds: its tensors' keys, dtypes and shapes, and shared constants.

A `Layout` is read from the first batch's rows, written next to the data as JSON, and checked
against every later batch (and against a resumed run's). `Layout.template(rows)` is a
TensorDict of `rows` rows that allocates nothing: tensordict's `memmap_like` turns it into
the files and metadata of the final result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.errors import TdhookFxError

MAX_JSON_BYTES = 16 << 20  # a layout or settings file larger than this is not one of ours
MAX_KEY_PARTS = 32


@dataclass(frozen=True)
class Leaf:
    """One stored tensor: its nested key, dtype, and the shape of one row."""

    key: tuple[str, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return f"{'.'.join(self.key)}: {shape} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Layout:
    """The leaves of one row, in file order, and JSON constants shared by every row."""

    leaves: tuple[Leaf, ...]
    constants: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, rows: TensorDictBase, constants: dict | None = None) -> Layout:
        leaves = tuple(
            Leaf(key if isinstance(key, tuple) else (key,), value.dtype, tuple(value.shape[1:]))
            for key, value in rows.items(include_nested=True, leaves_only=True)
        )
        constants = json.loads(json.dumps(constants or {}))  # as it reads back from the file
        return cls(leaves, tuple(sorted(constants.items())))

    def with_leaf(self, leaf: Leaf) -> Layout:
        return Layout((*self.leaves, leaf), self.constants)

    def difference(self, other: Layout) -> str | None:
        """What differs from `other`, in words (None when they are the same)."""
        if self == other:
            return None
        mine, theirs = {leaf.key: leaf for leaf in self.leaves}, {leaf.key: leaf for leaf in other.leaves}
        for key in {**mine, **theirs}:
            if key not in theirs or key not in mine:
                where = "only in the earlier batches" if key not in mine else "new"
                return f"entry {'.'.join(key)} is {where}"
            if mine[key] != theirs[key]:
                return f"{theirs[key].describe()} before, {mine[key].describe()} now"
        if self.constants != other.constants:
            return f"the shared entries differ ({dict(other.constants)} before, {dict(self.constants)} now)"
        return "the entries come in another order"

    def template(self, rows: int) -> TensorDict:
        """A TensorDict of `rows` rows with this layout (expanded scalars: nothing is allocated)."""
        td = TensorDict(batch_size=[rows])
        for leaf in self.leaves:
            td.set(leaf.key, torch.empty((), dtype=leaf.dtype).expand(rows, *leaf.shape))
        for name, value in self.constants:
            td.set_non_tensor(name, value)
        return td

    # ---- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "leaves": [{"key": list(leaf.key), "dtype": _dtype_name(leaf.dtype), "shape": list(leaf.shape)} for leaf in self.leaves],
            "constants": dict(self.constants),
        }

    @classmethod
    def from_json(cls, data, source: Path) -> Layout:
        def refuse(problem: str):
            raise TdhookFxError(f"{source} is not a layout written by tdhook_fx ({problem[:200]})")

        if not isinstance(data, dict) or not isinstance(data.get("leaves"), list) or not isinstance(data.get("constants"), dict):
            refuse("it needs a list of leaves and a dict of constants")
        leaves = []
        for entry in data["leaves"]:
            if not isinstance(entry, dict):
                refuse(f"bad leaf {entry!r}")
            key, dtype, shape = entry.get("key"), _dtype(entry.get("dtype")), entry.get("shape")
            if not isinstance(key, list) or not 0 < len(key) <= MAX_KEY_PARTS or not all(isinstance(p, str) for p in key):
                refuse(f"bad key {key!r}")
            if dtype is None:
                refuse(f"unknown dtype {entry.get('dtype')!r}")
            if not isinstance(shape, list) or len(shape) > 64 or not all(type(s) is int and s >= 0 for s in shape):
                refuse(f"bad shape {shape!r}")
            leaves.append(Leaf(tuple(key), dtype, tuple(shape)))
        return cls(tuple(leaves), tuple(sorted(data["constants"].items())))


def read_json(path: Path):
    """A small JSON file written by tdhook_fx (bounded in size; anything else is refused)."""
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_JSON_BYTES + 1)
    except OSError as error:
        raise TdhookFxError(f"cannot read {path}: {error}") from None
    if len(text) > MAX_JSON_BYTES:
        raise TdhookFxError(f"{path} is larger than any file tdhook_fx writes there ({MAX_JSON_BYTES} bytes)")
    try:
        return json.loads(text)
    except ValueError as error:
        raise TdhookFxError(f"{path} is not valid JSON ({error})") from None


def write_json(path: Path, data) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed into place)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    temporary.replace(path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) else None
