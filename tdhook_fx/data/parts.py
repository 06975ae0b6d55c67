"""One rank's part of a collection on disk: rows appended to one file per leaf, and a journal.

A part is a directory (`rank-<r>` inside the collection's `.collecting` folder) holding
- `layout.json`: the leaves of a row (written before the first rows);
- `<i>.bin`: the rows of leaf i, raw bytes in row order (tensordict's memmap format);
- `journal.jsonl`: one line per complete batch, appended after its rows are written:
  `{"batch": number, "rows": n, "examples": b, "counts": [...]}` (counts: rows per example when
  tokens are flattened).

A batch is complete once its journal line is (written by a thread of its own, after the
batch's rows, while the next batch is computed). Reopening a part for writing (a resumed run)
cuts every file back to its complete batches: rows of a batch interrupted half-way are
dropped, and the batch runs again. Nothing is written twice, nothing is lost. The writes are
plain `write` calls: what a killed process wrote stays in the operating system's cache and
reaches the disk (a power cut is another matter: nothing here calls fsync).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDictBase

from tdhook_fx.data.layout import Layout, read_json, write_json
from tdhook_fx.errors import TdhookFxError

JOURNAL = "journal.jsonl"
LAYOUT = "layout.json"
MAX_LINE_BYTES = 1 << 20  # a journal line: a batch's numbers (and its per-example counts)


@dataclass(frozen=True)
class Entry:
    """One complete batch of a part: its number, its rows, its examples (and rows per example)."""

    batch: int
    rows: int
    examples: int
    counts: tuple[int, ...] | None = None

    def to_line(self) -> bytes:
        data = {"batch": self.batch, "rows": self.rows, "examples": self.examples}
        if self.counts is not None:
            data["counts"] = list(self.counts)
        return (json.dumps(data, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes, where: str) -> Entry:
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict):
            numbers = [data.get("batch"), data.get("rows"), data.get("examples")]
            counts = data.get("counts")
            if all(type(n) is int and n >= 0 for n in numbers) and _fits(counts, numbers[1], numbers[2]):
                return cls(*numbers, None if counts is None else tuple(counts))
        raise TdhookFxError(f"{where}: not a journal line written by tdhook_fx: {line[:200]!r}")


def _fits(counts, rows: int, examples: int) -> bool:
    """Whether `counts` is absent, or whole numbers per example that add up to the rows."""
    if counts is None:
        return True
    return (
        isinstance(counts, list) and len(counts) == examples
        and all(type(n) is int and n >= 0 for n in counts) and sum(counts) == rows
    )


def read_part(directory: Path) -> tuple[Layout | None, list[Entry], int]:
    """A part's layout, its complete batches in journal order, and the journal's complete length in bytes."""
    layout = Layout.from_json(read_json(directory / LAYOUT), directory / LAYOUT) if (directory / LAYOUT).exists() else None
    entries, length = [], 0
    journal = directory / JOURNAL
    if journal.exists():
        with open(journal, "rb") as file:
            while True:
                line = file.readline(MAX_LINE_BYTES + 1)
                if not line.endswith(b"\n"):  # the end, or a line cut short by an interruption
                    if len(line) > MAX_LINE_BYTES:
                        raise TdhookFxError(f"{journal}: a line longer than {MAX_LINE_BYTES} bytes is not one of ours")
                    break
                entries.append(Entry.from_line(line, f"{journal}:{len(entries) + 1}"))
                length += len(line)
    if entries and layout is None:
        raise TdhookFxError(f"{directory} has a journal but no {LAYOUT}: it was not written by tdhook_fx")
    return layout, entries, length


def data_file(directory: Path, leaf_index: int) -> Path:
    return directory / f"{leaf_index}.bin"


class Part:
    """This rank's part, open for appending complete batches (`Part.open` resumes an existing one).

    The writes run on a thread of their own while the next batch is computed (a write call
    releases the GIL); at most `QUEUED` computed batches wait for it, so memory stays bounded.
    `close()` waits for the queued batches (they are complete: they are written) and re-raises
    a failed write.
    """

    QUEUED = 2

    def __init__(self, directory: Path, layout: Layout | None, entries: list[Entry]):
        self.directory = directory
        self.layout = layout
        self.entries = entries
        self._files: list | None = None
        self._journal = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @classmethod
    def open(cls, directory: Path) -> Part:
        """Open `directory` for writing; an interrupted batch's rows and journal text are cut away."""
        layout, entries, length = read_part(directory) if directory.exists() else (None, [], 0)
        if directory.exists():
            if (directory / JOURNAL).exists():
                os.truncate(directory / JOURNAL, length)
            committed = sum(entry.rows for entry in entries)
            for index, leaf in enumerate(layout.leaves if layout else ()):
                _cut(data_file(directory, index), committed * leaf.row_bytes)
        return cls(directory, layout, entries)

    def write(self, batch: int, rows: TensorDictBase, examples: int, counts: tuple[int, ...] | None, layout: Layout) -> None:
        """Append one complete batch: its rows (laid out as `layout`), then its journal line."""
        if self._files is None:
            self._start(layout)
        self._raise_failed_write()
        data = [_raw_bytes(rows.get(leaf.key)) for leaf in layout.leaves]
        self._queue.put((data, Entry(batch, rows.batch_size[0], examples, counts)))

    def _start(self, layout: Layout) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.layout is None:
            write_json(self.directory / LAYOUT, layout.to_json())
            self.layout = layout
        self._files = [open(data_file(self.directory, i), "ab", buffering=0) for i in range(len(layout.leaves))]
        self._journal = open(self.directory / JOURNAL, "ab", buffering=0)
        self._queue = queue.Queue(maxsize=self.QUEUED)
        self._thread = threading.Thread(target=self._writes, name=f"tdhook_fx writer {self.directory.name}", daemon=True)
        self._thread.start()

    def _writes(self) -> None:
        """The writer thread: each batch's rows, then its journal line; after a failure, only drains."""
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            data, entry = item
            try:
                for file, chunk in zip(self._files, data):
                    _write_all(file, chunk)
                _write_all(self._journal, memoryview(entry.to_line()))
                self.entries.append(entry)
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self._error = error

    def _raise_failed_write(self) -> None:
        if self._error is not None:
            raise TdhookFxError(f"writing to {self.directory} failed: {self._error}") from self._error

    def close(self) -> None:
        """Write what is queued, stop the writer, close the files; raise if a write failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        for file in [*(self._files or ()), *([self._journal] if self._journal else [])]:
            file.close()
        self._files, self._journal, self._thread = None, None, None
        self._raise_failed_write()


def _cut(path: Path, size: int) -> None:
    actual = path.stat().st_size if path.exists() else 0
    if actual < size:
        raise TdhookFxError(
            f"{path} holds {actual} bytes, fewer than its journal's complete batches need ({size}): the collection "
            "was changed by something else\n  hint: pass overwrite=True to start again"
        )
    if actual > size:
        os.truncate(path, size)


def _raw_bytes(value: torch.Tensor) -> memoryview:
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _write_all(file, data: memoryview) -> None:
    while data.nbytes:
        written = file.write(data)
        data = data[written:]
