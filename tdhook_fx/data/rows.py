"""From one call's result to the rows stored: chosen entries, storage dtype, tokens flattened.

`Rows.select(result, keys)` keeps the entries at `keys` (a key naming a sub-TensorDict, such
as "saved", keeps all its leaves), one row per example. `rows.flattened(mask)` makes one row
per token instead: every (B, T, ...) value becomes (n, ...) with the n tokens where `mask`
is nonzero (padding dropped), a per-example (B,) value (a label) is repeated for each of its
tokens, and a `position` column says where in its sequence each token was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.errors import InvalidArgument, MissingInputKey

POSITION = "position"  # with token flattening: the position of each row's token in its sequence


@dataclass(frozen=True)
class Rows:
    """The rows of one batch (`td`, batch size [rows]), its example count, rows per example, and
    JSON `constants` shared by every row (stored once, in tensordict's metadata)."""

    td: TensorDictBase
    examples: int
    counts: tuple[int, ...] | None = None
    constants: dict | None = None

    @classmethod
    def select(cls, result: TensorDictBase, keys: list, number: int) -> Rows:
        """The entries of `result` at `keys`, one row per example (batch `number` is named in errors)."""
        examples = result.batch_size[0]
        rows = TensorDict(batch_size=[examples])
        for key in keys:
            value = result.get(key, None)
            if value is None:
                known = sorted(map(str, result.keys(include_nested=True, leaves_only=True)))
                raise MissingInputKey(f"batch {number}: the result has no entry {key!r} to store; its entries: {known}")
            leaves = value.items(include_nested=True, leaves_only=True) if isinstance(value, TensorDictBase) else [((), value)]
            for inner, leaf in leaves:
                full = _join(key, inner)
                if not isinstance(leaf, torch.Tensor):
                    raise InvalidArgument(f"batch {number}: {full!r} is not a tensor ({type(leaf).__name__}); only tensors are stored")
                if leaf.dim() == 0 or leaf.shape[0] != examples:
                    raise InvalidArgument(
                        f"batch {number}: {full!r} has shape {tuple(leaf.shape)}, not one row per example "
                        f"({examples} examples)"
                    )
                rows.set(full, leaf.detach())
        return cls(rows, examples)

    def flattened(self, mask: torch.Tensor | None, number: int) -> Rows:
        """One row per token (where `mask` is nonzero; every token without a mask), plus `position`."""
        td, examples = self.td, self.examples
        if POSITION in td.keys():
            raise InvalidArgument(f"an entry named {POSITION!r} is stored already; token rows add one of that name")
        tokens = _token_count(td, mask, number)
        keep = torch.ones(examples, tokens, dtype=torch.bool) if mask is None else mask.to("cpu") != 0
        if tuple(keep.shape) != (examples, tokens):
            raise InvalidArgument(
                f"batch {number}: the mask has shape {tuple(keep.shape)}; it must be (examples, tokens) = {(examples, tokens)}"
            )
        counts = keep.sum(1)
        rows = TensorDict(batch_size=[int(counts.sum())])
        for key, value in td.items(include_nested=True, leaves_only=True):
            on_device = keep.to(value.device)
            if value.dim() == 1:
                rows.set(key, value.repeat_interleave(counts.to(value.device)))
            else:
                rows.set(key, value[on_device])
        rows.set(POSITION, keep.nonzero()[:, 1])
        return Rows(rows, examples, tuple(counts.tolist()), self.constants)

    def stored(self, dtype: torch.dtype | None) -> Rows:
        """On the CPU, floating-point values cast to `dtype` (if given): what is written."""
        td = self.td.apply(lambda x: x.to("cpu", dtype if dtype is not None and x.is_floating_point() else x.dtype))
        return Rows(td, self.examples, self.counts, self.constants)


def _token_count(td: TensorDictBase, mask: torch.Tensor | None, number: int) -> int:
    """T, the token dimension of the (B, T, ...) values; per-example (B,) values are allowed too."""
    sizes = {}
    for key, value in td.items(include_nested=True, leaves_only=True):
        if value.dim() >= 2:
            sizes[key] = value.shape[1]
    if mask is not None:
        if mask.dim() != 2:
            raise InvalidArgument(f"batch {number}: the mask has shape {tuple(mask.shape)}; it must be (examples, tokens)")
        tokens = mask.shape[1]
    elif sizes:
        tokens = next(iter(sizes.values()))
    else:
        raise InvalidArgument(f"batch {number}: no stored value has a token dimension (B, T, ...) to flatten")
    wrong = {key: size for key, size in sizes.items() if size != tokens}
    if wrong:
        key, size = next(iter(wrong.items()))
        raise InvalidArgument(
            f"batch {number}: cannot flatten tokens of {key!r}: its second dimension is {size}, not the {tokens} tokens "
            "(only (examples, tokens, ...) and per-example (examples,) values can be flattened)\n"
            "  hint: leave it out, or store it in a collection of its own without flattening"
        )
    return tokens


def _join(key, inner: tuple) -> tuple | str:
    outer = (key,) if isinstance(key, str) else tuple(key)
    inner = (inner,) if isinstance(inner, str) else tuple(inner)
    full = outer + inner
    return full[0] if len(full) == 1 else full
