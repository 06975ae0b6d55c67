"""A guarded way to load a `.pt2`: accept only what `cm.export` writes, and hand torch only that.

`torch.export.load` may run code from an archive in many ways (read from torch 2.13's
`torch/export/pt2_archive/_package.py` and `torch/_export/serde/serialize.py`): it finds
entries ignoring letter case; it reads every `models/*` file as a program, whatever its suffix,
with its own weights config; it joins a config's `path_name` with `os.path.join` (an absolute
name escapes the folder); it unpickles sample inputs, legacy weight files, `use_pickle`
payloads and custom objects (`weights_only=False`); it `eval`s every symbolic expression
(`sympify`), compiles `guards_code` into a function run on every call, and resolves a node's
target as any attribute of `torch`, `math` or `operator`.

So the audit is an allow-list, not a list of known tricks: `inspect_export(path)` reports
everything in the archive that is not exactly an entry, config field, graph field or manifest
field that `cm.export` writes (`tdhook_fx.shipping.pt2_format`), with strings that torch turns
into code limited to a small grammar (`tdhook_fx.shipping.pt2_code`), sizes bounded before
anything is read (entries stored uncompressed, as torch writes them, their declared sizes within
the file; each kind of entry has a size limit), and the graph's signature checked against the
manifest. `load_export(path)` then writes a new archive from the checked contents only (canonical
names, JSON re-serialized from what was checked, tensor bytes of the declared sizes) and gives
that to `torch.export.load`: torch never reads a byte of the original file, so differences
between zip readers cannot matter.

What it does not promise: that the graph computes the program the manifest shows (the program
text is the exporter's claim), or that running it is cheap (aten operators can be asked for
any amount of memory or time). See the README's section on shipping.
"""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field

import torch
from torch.export.pt2_archive._package import PT2ArchiveWriter

from tdhook_fx.errors import CodeInFile, ExportError, PickleInFile
from tdhook_fx.shipping import pt2_format as fmt
from tdhook_fx.shipping.printable import escaped, escaped_lines
from tdhook_fx.shipping.schema import Invalid

MAX_ENTRIES = 1 << 16

# ---- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str  # inside the archive, without its root folder
    size: int
    kind: str  # graph, config, manifest, tensor bytes, empty, format; or pickle, native code, unrecognized


@dataclass(frozen=True)
class ArchiveReport:
    """What a .pt2 holds, and everything in it that is not exactly what cm.export writes."""

    path: str
    entries: tuple[Entry, ...] = ()
    pickled: tuple[str, ...] = ()  # entries torch would unpickle
    native: tuple[str, ...] = ()  # entries that hold compiled code
    code: tuple[str, ...] = ()  # strings in the graph that torch would run, outside the accepted grammar
    problems: tuple[str, ...] = ()  # every other difference from what cm.export writes
    manifest: dict | None = field(default=None, compare=False)  # cm.export's manifest, when it is valid
    checked: tuple[str, ...] = ()  # what of the manifest was found in the graph

    @property
    def safe(self) -> bool:
        """Exactly what cm.export writes: no pickle, no native code, no Python in the graph."""
        return not (self.pickled or self.native or self.code or self.problems)

    def findings(self) -> list[str]:
        found = [f"pickle: {name}" for name in self.pickled]
        found += [f"native code: {name}" for name in self.native]
        found += [f"code in the graph: {line}" for line in self.code]
        found += [f"archive: {line}" for line in self.problems]
        return found

    def __str__(self) -> str:
        verdict = (
            "exactly what cm.export writes: no pickles, no native code, no Python in the graph"
            if self.safe
            else "UNSAFE to load from others (not what cm.export writes)"
        )
        lines = [f"{escaped(self.path)}: {verdict}"]
        if self.manifest is not None:
            lines.append(
                f"  exported by tdhook_fx; inputs: {', '.join(map(escaped, self.manifest['inputs']))}"
            )
            lines.append("  program (as the manifest states it):")
            lines.extend(f"  | {line}" for line in escaped_lines(self.manifest["program"].strip()))
            if self.manifest["runtime"]:
                lines.append(
                    f"  runtime buffers: {', '.join(map(escaped, self.manifest['runtime'].values()))}"
                )
            if self.checked:
                lines.append(f"  checked against the graph: {escaped('; '.join(self.checked))}")
            lines.append(
                "  not verified: that the graph computes this program (the text is the exporter's claim; "
                "the graph is only checked to hold plain tensor operators)"
            )
        kinds: dict[str, int] = {}
        for entry in self.entries:
            kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
        lines.append("  entries: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))
        lines.extend(f"  - {escaped(finding)}" for finding in self.findings())
        return "\n".join(lines)


# ---- inspect and load ---------------------------------------------------------------------------


def inspect_export(path: str | os.PathLike) -> ArchiveReport:
    """Read a .pt2 as a zip of data (nothing is loaded or run) and report what is not cm.export's."""
    with _Archive(path) as archive:
        return _Audit(archive, str(path)).run(read_tensors=False)[0]


def load_export(path: str | os.PathLike, *, trusted: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.load` of the parts of `path` that `inspect_export` checked, and nothing else.

    An archive that is not exactly what cm.export writes (`inspect_export(path).safe` is False)
    is refused (ExportError, listing why) unless `trusted=True`, which hands the file to
    `torch.export.load` unchecked: say so only for files you made or whose maker you trust.
    """
    if trusted:
        return _torch_load(path, path)
    with _Archive(path) as archive:
        report, contents = _Audit(archive, str(path)).run(read_tensors=True)
        if not report.safe:
            raise ExportError(
                f"refusing to load {escaped(str(path))}: it is not exactly what cm.export writes, and loading it "
                "could run code or exhaust memory\n"
                + "\n".join(f"  - {escaped(finding)}" for finding in report.findings())
                + "\n  hint: pass trusted=True only if you made this file or trust its maker"
            )
        with tempfile.TemporaryFile(suffix=".pt2") as rebuilt:
            try:
                with PT2ArchiveWriter(rebuilt) as writer:
                    for name, data in contents.items():
                        writer.write_bytes(name, data() if callable(data) else data)
            except (
                zipfile.BadZipFile,
                OSError,
                ValueError,
                EOFError,
                RuntimeError,
            ) as error:  # a bad CRC, a full disk
                raise ExportError(f"cannot read {escaped(str(path))}: {error}") from None
            rebuilt.seek(0)
            return _torch_load(rebuilt, path)


def _torch_load(source, path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(source)
    except Exception as error:  # torch's deserializer has many failure modes
        raise ExportError(
            f"torch.export.load could not load {escaped(str(path))}: {type(error).__name__}: {error}"
        ) from None


class _Archive:
    """The file opened as a zip (or the reason it is not one)."""

    def __init__(self, path):
        self.path = path
        self.file = None
        self.zip = None
        self.size = 0
        self.error = None

    def __enter__(self) -> _Archive:
        try:
            self.file = open(self.path, "rb")
        except OSError as error:
            raise ExportError(f"cannot read {escaped(str(self.path))}: {error}") from None
        status = os.fstat(self.file.fileno())
        if not stat.S_ISREG(status.st_mode):
            self.file.close()
            raise ExportError(f"cannot read {escaped(str(self.path))}: not a regular file")
        self.size = status.st_size
        try:
            self.zip = zipfile.ZipFile(self.file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            self.error = f"not a .pt2 (zip) archive: {error}"
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()
        self.file.close()


# ---- the audit ----------------------------------------------------------------------------------


class _Audit:
    """One pass over an archive: entries, then contents, then the graph against the manifest."""

    def __init__(self, archive: _Archive, path: str):
        self.archive = archive
        self.path = path
        self.pickled: list[str] = []
        self.native: list[str] = []
        self.code: list[str] = []
        self.problems: list[str] = []
        self.entries: list[Entry] = []
        self.infos: dict[str, zipfile.ZipInfo] = {}  # accepted entries by relative name

    def run(self, read_tensors: bool) -> tuple[ArchiveReport, dict]:
        if self.archive.error:
            return ArchiveReport(self.path, problems=(self.archive.error,)), {}
        infos = self.archive.zip.infolist()
        if len(infos) > MAX_ENTRIES:
            return ArchiveReport(
                self.path, problems=(f"{len(infos)} entries, more than the {MAX_ENTRIES} allowed",)
            ), {}
        self._check_entries(infos)
        contents, parsed = self._read_documents()
        manifest, checked = None, []
        if len(parsed) == 4 and not self.problems:
            graph, weights, constants, manifest = parsed
            checked = self._check_graph(graph, weights, constants, manifest)
        report = ArchiveReport(
            self.path,
            tuple(self.entries),
            tuple(self.pickled),
            tuple(self.native),
            tuple(self.code),
            tuple(self.problems),
            manifest,
            tuple(checked),
        )
        if read_tensors and report.safe:
            for name, info in self.infos.items():
                if fmt.entry_kind(name) == "tensor bytes":
                    contents[name] = lambda info=info: self._read(info, info.file_size)
        return report, contents

    # ---- entries: names, sizes, storage ----

    def _check_entries(self, infos: list[zipfile.ZipInfo]) -> None:
        if not infos:
            self.problems.append("an empty archive")
            return
        roots = {info.filename.split("/", 1)[0] for info in infos}
        root = infos[0].filename.split("/", 1)[0] if infos else ""
        if len(roots) != 1 or not root or "/" not in infos[0].filename:
            self.problems.append(
                f"expected every entry in one root folder, found {sorted(map(escaped, roots))[:5]}"
            )
        by_case: dict[str, list[str]] = {}
        declared = 0
        for info in infos:
            name = info.filename.split("/", 1)[1] if info.filename.startswith(root + "/") else info.filename
            by_case.setdefault(name.casefold(), []).append(name)
            declared += info.file_size
            kind = fmt.entry_kind(name) if info.filename.startswith(root + "/") else None
            if kind is None:
                kind = self._refuse_entry(name, info.filename.startswith(root + "/"), root)
            else:
                self._check_stored(name, info, kind)
                self.infos[name] = info
            self.entries.append(Entry(name, info.file_size, kind))
        for names in by_case.values():
            if len(names) > 1:
                self.problems.append(
                    f"{names[0]}: {len(names)} entries with this name (ignoring letter case, as torch's reader does)"
                )
        missing = [name for name in fmt.REQUIRED_ENTRIES if name not in self.infos]
        if missing:
            self.problems.append(f"missing {', '.join(missing)} (cm.export writes them)")
        if declared > self.archive.size:
            self.problems.append(
                f"the entries declare {declared} bytes in a file of {self.archive.size} "
                "(entries overlap or are compressed)"
            )

    def _refuse_entry(self, name: str, inside: bool, root: str) -> str:
        folded = name.casefold()
        if not inside:
            why = f"outside the archive's root folder {root!r}"
        elif _allowed_ignoring_case(folded):
            why = (
                "differs from an entry cm.export writes only in letter case "
                "(torch's reader ignores case and would read it)"
            )
        elif folded.startswith("models/"):
            why = "a second graph (torch loads every models/* file as a program, with its own configs)"
        else:
            why = "not an entry cm.export writes"
        kind = _refused_kind(folded)
        {"pickle": self.pickled, "native code": self.native}.get(kind, self.problems).append(f"{name}: {why}")
        return kind

    def _check_stored(self, name: str, info: zipfile.ZipInfo, kind: str) -> None:
        if kind == "empty" and info.file_size:
            self.pickled.append(
                f"{name}: not empty (torch would unpickle it, with weights_only=False if need be)"
            )
        elif info.compress_type != zipfile.ZIP_STORED:
            self.problems.append(
                f"{name}: compressed (torch writes entries stored; "
                "compressed data can expand far beyond the file)"
            )
        elif info.flag_bits & 0x1:
            self.problems.append(f"{name}: encrypted")
        elif info.file_size != info.compress_size:
            self.problems.append(f"{name}: declares {info.file_size} bytes but stores {info.compress_size}")
        elif kind in fmt.LIMITS and info.file_size > fmt.LIMITS[kind]:
            self.problems.append(
                f"{name}: {info.file_size} bytes, more than the {fmt.LIMITS[kind]} a {kind} entry may hold"
            )

    # ---- contents ----

    def _read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        with self.archive.zip.open(info) as stream:
            data = stream.read(limit + 1)
        if len(data) != info.file_size:
            raise zipfile.BadZipFile(f"holds {len(data)} bytes, declares {info.file_size}")
        return data

    def _read_documents(self) -> tuple[dict, list]:
        """The checked contents of every entry but tensor bytes (canonical), and the parsed documents."""
        contents: dict[str, bytes] = {}
        parsed = []
        documents = (
            (fmt.GRAPH_ENTRY, fmt.GRAPH),
            (fmt.WEIGHTS_CONFIG_ENTRY, fmt.WEIGHTS),
            (fmt.CONSTANTS_CONFIG_ENTRY, fmt.CONSTANTS),
            (fmt.MANIFEST_ENTRY, fmt.MANIFEST),
        )
        for name, info in self.infos.items():
            kind = fmt.entry_kind(name)
            if kind == "tensor bytes" or info.file_size > fmt.LIMITS.get(kind, 0):
                continue
            try:
                data = self._read(info, fmt.LIMITS[kind])
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
                self.problems.append(f"{name}: cannot be read ({error})")
                continue
            if kind == "format":
                if not fmt.FORMAT_ENTRIES[name].fullmatch(data):
                    self.problems.append(f"{name}: holds {data[:64]!r}, not what torch writes")
            elif kind == "empty":
                contents[name] = b""
            else:
                contents[name] = data
        for name, spec in documents:
            if name not in contents:
                continue
            try:
                value, contents[name] = fmt.canonical(contents[name], spec, fmt.LIMITS[fmt.entry_kind(name)])
                if name == fmt.GRAPH_ENTRY and fmt.count_expressions(contents[name]) > fmt.MAX_EXPRESSIONS:
                    raise Invalid("", f"more than {fmt.MAX_EXPRESSIONS} symbolic expressions")
                parsed.append(value)
            except CodeInFile as error:
                self.code.append(f"{name}: {error}")
            except PickleInFile as error:
                self.pickled.append(f"{name}: {error}")
            except Invalid as error:
                self.problems.append(f"{name}: {error}")
        return contents, parsed

    def _check_graph(self, graph: dict, weights: dict, constants: dict, manifest: dict) -> list[str]:
        sizes = {
            name: info.file_size
            for name, info in self.infos.items()
            if fmt.entry_kind(name) == "tensor bytes"
        }
        for directory, config in (("data/weights", weights), ("data/constants", constants)):
            self.problems.extend(f"{directory}: {p}" for p in fmt.check_storage(config, directory, sizes))
        self.code.extend(f"{fmt.GRAPH_ENTRY}: {line}" for line in fmt.check_guards(graph, manifest["inputs"]))
        problems, checked = fmt.check_against_manifest(graph, weights, constants, manifest)
        self.problems.extend(f"{fmt.GRAPH_ENTRY} against {fmt.MANIFEST_ENTRY}: {p}" for p in problems)
        return checked


def _refused_kind(folded: str) -> str:
    if folded.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")) or folded.endswith(
        (".so", ".dll", ".dylib")
    ):
        return "native code"
    if folded.endswith((".pt", ".pkl", ".pickle")) or any(
        p in folded for p in ("custom_obj_", "opaque_obj_")
    ):
        return "pickle"
    if folded.startswith(("data/weights/", "data/constants/")) and not folded.endswith(".json"):
        return "pickle"  # a payload a crafted config can point torch at (use_pickle)
    return "unrecognized"


def _allowed_ignoring_case(folded: str) -> bool:
    """Whether an entry's name, in lower case, is one cm.export writes (also in lower case)."""
    return any(folded == n.casefold() for n in fmt.REQUIRED_ENTRIES) or bool(
        fmt.WEIGHT_ENTRY.fullmatch(folded) or fmt.CONSTANT_ENTRY.fullmatch(folded)
    )
