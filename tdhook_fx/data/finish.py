"""Joining the parts into one memory-mapped TensorDict, rows in the order of the batches.

`Plan.of(parts, count)` checks that every batch 0..count-1 is in exactly one part, with one
layout, and places each batch's rows in the result. Rank 0 creates the result's files and
metadata with tensordict's `memmap_like` (sparse files, `existsok` keeps what a previous
attempt filled). Then each part is moved or copied into place by one rank:
- a single part that holds every batch in order *is* the result: its files are renamed;
- otherwise each batch's rows are copied at their place (`os.copy_file_range`, in the kernel).
With token flattening, an `example` column (the index of each row's example) is written from
the journals. Every step can run again after an interruption and gives the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict

from tdhook_fx.data.layout import Layout, Leaf
from tdhook_fx.data.parts import Entry, data_file
from tdhook_fx.errors import TdhookFxError

EXAMPLE = "example"  # with token flattening: the example (in the order of the whole data) of each row
EXAMPLE_LEAF = Leaf((EXAMPLE,), torch.int64, ())
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class Placed:
    """One batch: which part holds it, at which row there, at which row of the result."""

    entry: Entry
    part: Path
    part_row: int
    row: int
    example: int  # the index of its first example in the whole data


@dataclass(frozen=True)
class Plan:
    layout: Layout  # the result's layout (the parts' plus `example` with token flattening)
    placed: tuple[Placed, ...]
    rows: int
    examples: int

    @classmethod
    def of(cls, parts: dict[Path, tuple[Layout | None, list[Entry]]], count: int, where: Path) -> Plan:
        holders: dict[int, tuple[Path, Entry, int]] = {}
        layouts = {}
        for part, (layout, entries) in parts.items():
            row = 0
            for entry in entries:
                if entry.batch in holders or entry.batch >= count:
                    other = f"also in {holders[entry.batch][0].name}" if entry.batch in holders else f"but there are {count} batches"
                    raise TdhookFxError(
                        f"{where}: batch {entry.batch} is in {part.name} {other}: the partial result does not "
                        "fit these batches\n  hint: pass the same batches as the interrupted run, or overwrite=True"
                    )
                holders[entry.batch] = (part, entry, row)
                row += entry.rows
            if entries:
                layouts[part] = layout
        missing = [b for b in range(count) if b not in holders]
        if missing:
            raise TdhookFxError(f"{where}: batches {missing[:10]} were never written (a rank stopped early?)")
        if not layouts:
            raise TdhookFxError("there were no batches to collect")
        first_part, layout = next(iter(layouts.items()))
        for part, other in layouts.items():
            difference = other.difference(layout)
            if difference:
                raise TdhookFxError(f"{where}: {part.name} and {first_part.name} hold different rows: {difference}")
        placed, row, example = [], 0, 0
        for batch in range(count):
            part, entry, part_row = holders[batch]
            placed.append(Placed(entry, part, part_row, row, example))
            row += entry.rows
            example += entry.examples
        if any(p.entry.counts is not None for p in placed):
            layout = layout.with_leaf(EXAMPLE_LEAF)
        return cls(layout, tuple(placed), row, example)

    def in_place(self) -> bool:
        """Whether one part holds every batch in order (so its files are the result's, as they are)."""
        return len({p.part for p in self.placed}) == 1 and all(p.part_row == p.row for p in self.placed)


def create(path: Path, plan: Plan) -> None:
    """The result's files (sparse) and tensordict metadata; files a previous attempt filled are kept."""
    plan.layout.template(plan.rows).memmap_like(path, existsok=True)


def fill(path: Path, plan: Plan, parts: list[Path]) -> None:
    """Move or copy the rows of `parts` into the result at `path` (and write their example column)."""
    result = TensorDict.load_memmap(path)
    spooled = [leaf for leaf in plan.layout.leaves if leaf != EXAMPLE_LEAF]
    targets = [_filename(result, leaf) for leaf in spooled]
    mine = [p for p in plan.placed if p.part in parts]
    if plan.in_place():
        for index, target in enumerate(targets):
            source = data_file(mine[0].part, index) if mine else None
            if source is not None and source.exists() and target is not None:
                os.replace(source, target)  # absent: an earlier attempt moved it
    else:
        for index, (leaf, target) in enumerate(zip(spooled, targets)):
            if target is None or not leaf.row_bytes:
                continue
            with open(target, "r+b") as out:
                for p in mine:
                    with open(data_file(p.part, index), "rb") as source:
                        _copy(source, out, p.part_row * leaf.row_bytes, p.row * leaf.row_bytes, p.entry.rows * leaf.row_bytes)
    target = _filename(result, EXAMPLE_LEAF) if EXAMPLE_LEAF in plan.layout.leaves else None
    if target is not None:
        with open(target, "r+b") as out:
            for p in mine:
                first = torch.arange(p.example, p.example + p.entry.examples)
                examples = first.repeat_interleave(torch.tensor(p.entry.counts, dtype=torch.int64))
                os.pwrite(out.fileno(), examples.numpy().tobytes(), p.row * EXAMPLE_LEAF.row_bytes)


def _filename(result: TensorDict, leaf: Leaf) -> str | None:
    """The file of `leaf` in the result (None for a leaf without elements, which has no file)."""
    return getattr(result.get(leaf.key), "filename", None) if leaf.row_bytes and result.batch_size[0] else None


def _copy(source, out, source_offset: int, offset: int, size: int) -> None:
    """Copy `size` bytes between two files at the given offsets, in the kernel where it can."""
    while size > 0:
        step = min(size, COPY_CHUNK)
        try:
            done = os.copy_file_range(source.fileno(), out.fileno(), step, source_offset, offset)
        except OSError:  # another file system, or no copy_file_range: through a bounded buffer
            done = os.pwrite(out.fileno(), os.pread(source.fileno(), step, source_offset), offset)
        if done <= 0:
            raise TdhookFxError(f"{source.name} ended early: the collection's part files were changed by something else")
        size, source_offset, offset = size - done, source_offset + done, offset + done

