"""Running a function over numbered batches into one memory-mapped TensorDict on disk, resumably.

`stream_to_disk(source, path, rows_of, settings=...)` is what `collect` and a streamed `sweep`
share. Each rank (one process, or each of a `torchrun` group) takes its batches (batch i is
rank i % world's), skips those a previous run completed, and appends each batch's rows to its
own part (`tdhook_fx.data.parts`) as soon as they are computed: memory holds one batch at a time
whatever the size of the data. When all ranks are through, the parts are joined in batch order
(`tdhook_fx.data.finish`), rank 0 writes the metadata, and every rank returns
`TensorDict.load_memmap(path)`.

The directory, while running and after:

    path/.collecting/settings.json       what is being collected (a rerun must ask for the same)
    path/.collecting/rank-<r>/...        each rank's part (rows and journal)
    path/meta.json, path/*.memmap, ...   the result: tensordict's memmap format
    path/collect.json                    written last: the result is complete

A rerun with the same settings continues where the last one stopped (with any number of
ranks); a finished directory is returned as it is.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tensordict import TensorDict, TensorDictBase

from tdhook_fx.data.batches import BatchSource
from tdhook_fx.data.finish import Plan, create, fill
from tdhook_fx.data.layout import Layout, read_json, write_json
from tdhook_fx.data.parts import Part, read_part
from tdhook_fx.data.progress import progress_bar
from tdhook_fx.data.ranks import Ranks
from tdhook_fx.data.rows import Rows
from tdhook_fx.errors import TdhookFxError

COLLECTING = ".collecting"
SETTINGS = "settings.json"
FINISHED = "collect.json"
FORMAT = "tdhook_fx collection"
_PART = re.compile(r"rank-(\d{1,6})")


def stream_to_disk(
    source: BatchSource,
    path,
    rows_of: Callable[[TensorDictBase, int], Rows],
    *,
    settings: dict,
    overwrite: bool = False,
    progress: bool | None = None,
    description: str = "collect",
) -> TensorDictBase:
    """Write `rows_of(batch, number)` for every batch of `source` into one memory-mapped TensorDict at `path`.

    `settings` (JSON) says what is collected: a directory started with other settings is
    refused (or, with `overwrite=True`, replaced). Returns the result, read back with `load_memmap`.
    """
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    ranks = Ranks.current()
    ranks.together(lambda: _prepare(path, settings, source.count, overwrite) if ranks.rank == 0 else None, f"preparing {path}")
    if (path / FINISHED).exists():
        return TensorDict.load_memmap(path)
    work = path / COLLECTING
    part = Part.open(work / f"rank-{ranks.rank}")
    done, expected = _completed(work, part)
    try:
        with _progress_bar(source, ranks, done, progress, description) as bar:
            for number, batch in source.take(lambda n: ranks.owns(n) and n not in done):
                rows = rows_of(batch, number)
                layout = Layout.of(rows.td, rows.constants)
                difference = layout.difference(expected) if expected is not None else None
                if difference:
                    raise TdhookFxError(f"batch {number} gives other rows than the batches before it: {difference}{_HINT}")
                expected = layout
                part.write(number, rows.td, rows.examples, rows.counts, layout)
                bar.update(1)
    finally:
        part.close()
    return _finish(path, ranks, source.count, settings)


_HINT = (
    "\n  hint: every batch must give values of the same shape per example (pad sequences to one length, or "
    "flatten tokens with mask=...); to start again with other settings, pass overwrite=True"
)


def _prepare(path: Path, settings: dict, count: int | None, overwrite: bool) -> None:
    """Rank 0: check what `path` holds against `settings`; start it, or clear it with `overwrite`."""
    ours = (path / FINISHED).exists() or (path / COLLECTING).exists()
    if path.exists() and not path.is_dir():
        raise TdhookFxError(f"{path} is a file; collect writes a directory\n  hint: pick another path")
    if path.exists() and any(path.iterdir()) and not ours:
        raise TdhookFxError(
            f"{path} holds other files: collect writes only into a new or empty directory, or one it wrote "
            "(never deleting anything else)\n  hint: pick another path"
        )
    if ours and overwrite:
        shutil.rmtree(path)
    elif ours:
        if (path / FINISHED).exists():
            found = read_json(path / FINISHED)
            found_settings, found_count = found.get("settings"), found.get("batches")
        else:
            found = read_json(path / COLLECTING / SETTINGS)
            found_settings, found_count = found.get("settings"), found.get("batches")
        if found_settings != settings:
            raise TdhookFxError(
                f"{path} holds a collection with other settings\n  before: {json.dumps(found_settings)[:600]}\n"
                f"  now:    {json.dumps(settings)[:600]}\n  hint: pass overwrite=True (--overwrite on the command line) to replace it, or pick another path"
            )
        if count is not None and found_count is not None and found_count != count:
            raise TdhookFxError(
                f"{path} holds a collection of {found_count} batches; these are {count}\n"
                "  hint: pass overwrite=True (--overwrite on the command line) to replace it, or pick another path"
            )
        if (path / FINISHED).exists():
            shutil.rmtree(path / COLLECTING, ignore_errors=True)  # left over if the last run stopped just after
        return
    (path / COLLECTING).mkdir(parents=True, exist_ok=True)
    write_json(path / COLLECTING / SETTINGS, {"format": FORMAT, "settings": settings, "batches": count})


def _parts(work: Path) -> list[Path]:
    found = [p for p in work.iterdir() if p.is_dir() and _PART.fullmatch(p.name)] if work.exists() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("rank-")))


def _completed(work: Path, part: Part) -> tuple[set[int], Layout | None]:
    """The batches any part completed (by this run's ranks or an earlier run's), and their layout."""
    done, layout = {entry.batch for entry in part.entries}, part.layout
    for other in _parts(work):
        if other != part.directory:
            found, entries, _ = read_part(other)
            done.update(entry.batch for entry in entries)
            layout = layout or found
    return done, layout


def _finish(path: Path, ranks: Ranks, count: int | None, settings: dict) -> TensorDictBase:
    counts = ranks.gather(count)
    if len(set(counts)) != 1:
        raise TdhookFxError(
            f"the ranks saw different numbers of batches ({counts}): every rank must be given the same batches"
        )
    work = path / COLLECTING
    parts = _parts(work)

    def plan() -> Plan:
        return Plan.of({p: read_part(p)[:2] for p in parts}, count, path)

    planned = ranks.together(plan, f"joining the parts of {path}")
    ranks.together(lambda: create(path, planned) if ranks.rank == 0 else None, f"creating {path}")
    mine = [p for i, p in enumerate(parts) if i % ranks.world == ranks.rank]
    ranks.together(lambda: fill(path, planned, mine), f"filling {path}")
    ranks.together(lambda: _seal(path, planned, settings, count) if ranks.rank == 0 else None, f"finishing {path}")
    return TensorDict.load_memmap(path)


def _seal(path: Path, plan: Plan, settings: dict, count: int) -> None:
    """Rank 0: mark the result complete (collect.json), then remove the parts."""
    summary = {
        "format": FORMAT,
        "settings": settings,
        "batches": count,
        "examples": plan.examples,
        "rows": plan.rows,
        "entries": [leaf.describe() for leaf in plan.layout.leaves],
    }
    write_json(path / FINISHED, summary)
    shutil.rmtree(path / COLLECTING)


def _progress_bar(source: BatchSource, ranks: Ranks, done: set[int], progress: bool | None, description: str):
    """tqdm on rank 0 when asked, or by default when standard error is a terminal."""
    shown = (sys.stderr.isatty() if progress is None else progress) and ranks.rank == 0
    total = None
    if source.count is not None:
        total = sum(1 for n in range(source.count) if ranks.owns(n) and n not in done)
    return progress_bar(shown, progress, total=total, desc=description, unit="batch")
