"""Where batches come from: numbered TensorDicts, fetched only for the batches a rank still needs.

`batch_source(batches, batch_size)` accepts
- a sequence of batches (a list of TensorDicts or of dicts of tensors), read by index;
- a `torch.utils.data.DataLoader`: over a map-style dataset, the batches a rank skips are never
  loaded (its batch sampler is filtered, workers and collate_fn kept); it must keep the data's
  order (no shuffling) and must not be split already (no DistributedSampler);
- a TensorDict of examples, or a Hugging Face `datasets.Dataset`, cut into `batch_size` slices;
- any other iterable of batches (a generator, a `datasets.IterableDataset` with `batch_size`),
  read in order, skipped batches included.
A batch may be a TensorDict or a mapping of tensors (a DataLoader's default collation, a
`datasets` slice in torch format); entries that are not tensors (raw text) are left out.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType

DEFAULT_BATCH_SIZE = 32


class BatchSource:
    """Numbered batches: `count` (None until an iterable of unknown length is exhausted) and `take`."""

    def __init__(self, count: int | None, numbered: Callable[[Callable[[int], bool]], Iterator[tuple[int, object]]]):
        self.count = count
        self._numbered = numbered

    def take(self, wanted: Callable[[int], bool]) -> Iterator[tuple[int, TensorDictBase]]:
        """`(number, batch)` for each batch whose number is `wanted`, in order; `count` is known after."""
        for number, batch in self._numbered(wanted):
            yield number, as_tensordict(batch, number)


def batch_source(batches, batch_size: int | None = None) -> BatchSource:
    """The numbered batches of `batches` (see the module docstring for what it may be)."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InvalidArgument(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
    if isinstance(batches, TensorDictBase):
        return _slices(batches, len(batches), batch_size, lambda start, stop: batches[start:stop])
    hf = _hugging_face(batches)
    if hf == "map":
        table = batches.with_format("torch")
        return _slices(batches, len(table), batch_size, lambda start, stop: table[start:stop])
    if hf == "iterable":
        size = batch_size or DEFAULT_BATCH_SIZE
        return _streamed(batches.with_format("torch").iter(batch_size=size))
    if batch_size is not None:
        raise InvalidArgument(
            "batch_size cuts a TensorDict or a Hugging Face dataset into batches; "
            f"{type(batches).__name__} already yields batches\n  hint: leave batch_size out"
        )
    from torch.utils.data import DataLoader

    if isinstance(batches, DataLoader):
        return _loader(batches)
    if isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise InvalidArgumentType(
            f"batches must be an iterable of batches (a DataLoader, a list of TensorDicts, a generator), "
            f"a TensorDict of examples or a datasets.Dataset, not {type(batches).__name__}"
        )
    if isinstance(batches, Sequence):
        return _indexed(len(batches), batches.__getitem__)
    return _streamed(batches)


def as_tensordict(batch, number: int = 0) -> TensorDictBase:
    """A batch as a TensorDict whose batch size is its leading dimension (the examples)."""
    if isinstance(batch, TensorDictBase):
        if batch.batch_dims != 1:
            raise InvalidArgument(
                f"batch {number} has batch size {list(batch.batch_size)}; collect needs one batch dimension "
                "(the examples)\n  hint: TensorDict(..., batch_size=[number_of_examples])"
            )
        return batch
    if not isinstance(batch, Mapping):
        raise InvalidArgumentType(
            f"batch {number} is a {type(batch).__name__}; a batch is a TensorDict or a mapping of tensors "
            "(input key -> tensor)"
        )
    tensors = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            raise InvalidArgument(
                f"entry {key!r} of batch {number} is a list of tensors of different lengths, not one tensor\n"
                "  hint: pad every example to one length (tokenizer(..., padding='max_length', max_length=...))"
            )
    if not tensors:
        raise InvalidArgument(f"batch {number} holds no tensors (keys: {sorted(map(str, batch))})")
    sizes = {key: value.shape[0] if value.dim() else None for key, value in tensors.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise InvalidArgument(f"the tensors of batch {number} differ in their first (example) dimension: {sizes}")
    return TensorDict(tensors, batch_size=[next(iter(sizes.values()))])


# ---- kinds of sources ---------------------------------------------------------------------------


def _indexed(count: int, get: Callable[[int], object]) -> BatchSource:
    def numbered(wanted):
        for number in range(count):
            if wanted(number):
                yield number, get(number)

    return BatchSource(count, numbered)


def _slices(examples, length: int, batch_size: int | None, cut: Callable[[int, int], object]) -> BatchSource:
    size = batch_size or DEFAULT_BATCH_SIZE
    if length == 0:
        raise InvalidArgument(f"the {type(examples).__name__} holds no examples")
    return _indexed(-(-length // size), lambda number: cut(number * size, min(length, (number + 1) * size)))


def _streamed(iterable: Iterable) -> BatchSource:
    def numbered(wanted):
        number = -1
        for number, batch in enumerate(iterable):
            if wanted(number):
                yield number, batch
        source.count = number + 1

    source = BatchSource(None, numbered)
    return source


def _loader(loader) -> BatchSource:
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    if any(isinstance(s, DistributedSampler) for s in samplers):
        raise InvalidArgument(
            "this DataLoader already holds one rank's share (a DistributedSampler): collect splits the batches "
            "between ranks itself\n  hint: give every rank the whole DataLoader (no sampler)"
        )
    if any(isinstance(s, RandomSampler) for s in samplers):
        raise InvalidArgument(
            "this DataLoader shuffles: collect keeps the data's order, so that row i of the result is example i "
            "and a rerun can resume where it stopped\n  hint: DataLoader(..., shuffle=False)"
        )
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        return _streamed(loader)
    numbers: collections.deque[int] = collections.deque()

    class Chosen:
        """The loader's batch sampler, filtered: only the index lists of wanted batches reach the workers."""

        def __init__(self, wanted):
            self.wanted = wanted

        def __iter__(self):
            for number, indices in enumerate(loader.batch_sampler):
                if self.wanted(number):
                    numbers.append(number)
                    yield indices

    def numbered(wanted):
        filtered = DataLoader(
            loader.dataset, batch_sampler=Chosen(wanted), num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        )
        for batch in filtered:  # in order: the DataLoader's default in_order=True
            yield numbers.popleft(), batch

    return BatchSource(len(loader), numbered)


def _hugging_face(batches) -> str | None:
    """"map" for a `datasets.Dataset`, "iterable" for a `datasets.IterableDataset`, else None."""
    if "datasets" not in sys.modules or not type(batches).__module__.startswith("datasets"):
        return None
    import datasets

    if isinstance(batches, datasets.Dataset):
        return "map"
    if isinstance(batches, datasets.IterableDataset):
        return "iterable"
    return None
