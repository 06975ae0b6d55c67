"""What a `.pt2` archive could run when loaded, and a guarded way to load one.

What a .pt2 may run when loaded (found by reading torch 2.13's `torch/export/pt2_archive`
and `torch/_export/serde/serialize.py`):

- pickles: `data/sample_inputs/<model>.pt` (always a `torch.save` file, loaded with
  `weights_only=True` and, when that fails, again with `weights_only=False`); payloads that
  the weights/constants configs mark `use_pickle` (tensor subclasses); `custom_obj_*` and
  `opaque_obj_*` constants; the legacy `data/weights/<model>.pt` and `.../constants/<model>.pt`;
- native code: `data/aotinductor/` (shared libraries);
- Python in the graph JSON: `guards_code` strings are compiled into a function that runs on
  every call; every `expr_str` (symbolic shapes) goes through `sympy.sympify`, i.e. `eval`;
  a node's `target` may name any callable reachable from `torch`, `math` or `_operator`
  (`torch.os.system` included), which then runs when the graph runs.

`inspect_export(path)` reports all of these without loading anything; `load_export(path)`
refuses an archive that has any of them unless `trusted=True`. Archives written by
`cm.export` contain none: the sample inputs are left empty, tensors are raw bytes, the graph
holds only aten operators, simple shape guards and sympy arithmetic.
"""

from __future__ import annotations

import ast as python_ast
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdhook_fx.errors import ExportError
from tdhook_fx.shipping.export import MANIFEST

# ---- inspect ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str  # inside the archive, without its root folder
    size: int
    kind: str  # graph, config, tensor bytes, pickle, native code, text, format, empty, unrecognized


@dataclass(frozen=True)
class ArchiveReport:
    """What a .pt2 holds, and everything in it that could run code when loaded."""

    path: str
    entries: tuple[Entry, ...] = ()
    pickled: tuple[str, ...] = ()  # entries that hold pickles
    native: tuple[str, ...] = ()  # entries that hold compiled code
    code: tuple[str, ...] = ()  # strings in the graph that would run as Python, unknown call targets
    problems: tuple[str, ...] = ()  # not an archive, duplicate entries, no graph
    manifest: dict | None = field(default=None, compare=False)  # what cm.export recorded

    @property
    def safe(self) -> bool:
        """No pickle, no native code, nothing in the graph that runs as Python."""
        return not (self.pickled or self.native or self.code or self.problems)

    def findings(self) -> list[str]:
        found = [f"pickle: {name}" for name in self.pickled]
        found += [f"native code: {name}" for name in self.native]
        found += [f"code in the graph: {line}" for line in self.code]
        found += [f"archive: {line}" for line in self.problems]
        return found

    def __str__(self) -> str:
        verdict = "no pickles, no native code, no Python in the graph" if self.safe else "UNSAFE to load from others"
        lines = [f"{self.path}: {verdict}"]
        if self.manifest:
            lines.append(f"  exported by tdhook_fx; inputs: {', '.join(self.manifest.get('inputs', []))}")
            program = str(self.manifest.get("program", "")).strip()
            lines.extend(f"  | {line}" for line in program.splitlines())
            if self.manifest.get("runtime"):
                lines.append(f"  runtime buffers: {', '.join(self.manifest['runtime'].values())}")
        kinds: dict[str, int] = {}
        for entry in self.entries:
            kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
        lines.append("  entries: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))
        lines.extend(f"  - {finding}" for finding in self.findings())
        return "\n".join(lines)


def inspect_export(path: str | os.PathLike) -> ArchiveReport:
    """Read a .pt2 as a zip of data (nothing is loaded or run) and report what could run code."""
    data = _read(path)
    return _audit(data, str(path))


def load_export(path: str | os.PathLike, *, trusted: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.load`, after `inspect_export` found nothing that runs code on loading.

    An archive with pickles, native code or Python strings in its graph is refused
    (ExportError, listing them) unless `trusted=True`: say so only for files you made or
    whose maker you trust. The file is read once; what was checked is what is loaded.
    """
    data = _read(path)
    report = _audit(data, str(path))
    if not report.safe and not trusted:
        raise ExportError(
            f"refusing to load {path}: loading it could run code\n"
            + "\n".join(f"  - {finding}" for finding in report.findings())
            + "\n  hint: pass trusted=True only if you made this file or trust its maker; "
            "files written by cm.export contain none of these"
        )
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as error:  # torch's deserializer has many failure modes
        raise ExportError(f"torch.export.load could not load {path}: {type(error).__name__}: {error}") from None


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ExportError(f"cannot read {path}: {error}") from None


def _audit(data: bytes, path: str) -> ArchiveReport:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return ArchiveReport(path, problems=(f"not a .pt2 (zip) archive: {error}",))
    names = [info.filename for info in infos]
    problems, pickled, native, code = [], [], [], []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # two readers could disagree on which one counts
        problems.append(f"duplicate entries: {', '.join(duplicates)}")
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        problems.append(f"expected one root folder, found {sorted(roots)}")
    relative = {info.filename.split("/", 1)[-1]: info for info in infos}
    use_pickle = _pickled_payloads(archive, relative, problems)
    entries = []
    for name, info in relative.items():
        kind = _kind(name, info.file_size, use_pickle)
        entries.append(Entry(name, info.file_size, kind))
        if kind == "pickle":
            pickled.append(name)
        elif kind == "native code":
            native.append(name)
    graphs = [name for name in relative if name.startswith("models/") and name.endswith(".json")]
    legacy = "serialized_exported_program.json" in relative
    if not graphs and not legacy:
        problems.append("no models/*.json: not an archive written by torch.export.save")
    for name in graphs + (["serialized_exported_program.json"] if legacy else []):
        code.extend(f"{name}: {line}" for line in _graph_code(archive.read(relative[name]), name))
    manifest = None
    if f"extra/{MANIFEST}" in relative:
        try:
            manifest = json.loads(archive.read(relative[f"extra/{MANIFEST}"]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"extra/{MANIFEST} is not JSON")
    return ArchiveReport(
        path, tuple(entries), tuple(pickled), tuple(native), tuple(code), tuple(problems), manifest
    )


def _pickled_payloads(archive, relative: dict, problems: list) -> set[str]:
    """Entries that the weights/constants configs say are pickled (`use_pickle`)."""
    pickled = set()
    for name, info in relative.items():
        if not re.fullmatch(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json", name):
            continue
        directory = name.rsplit("/", 1)[0]
        try:
            config = json.loads(archive.read(info))["config"]
            for payload in config.values():
                if payload.get("use_pickle"):
                    pickled.add(f"{directory}/{payload['path_name']}")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            problems.append(f"{name} is not a valid payload config")
    return pickled


def _kind(name: str, size: int, use_pickle: set[str]) -> str:
    if name in use_pickle:
        return "pickle"
    if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
        return "native code"
    if name.endswith((".pt", ".pkl")) or "/custom_obj_" in name or "/opaque_obj_" in name:
        return "empty" if size == 0 else "pickle"
    if name.startswith("extra/"):
        return "text"
    if name.endswith(".json"):
        return "graph" if name.startswith(("models/", "serialized_")) else "config"
    if re.fullmatch(r"data/weights/weight_\d+|data/constants/tensor_\d+", name):
        return "tensor bytes"
    if name in ("archive_format", "archive_version", "byteorder", "version") or name.startswith(".data/"):
        return "format"
    return "unrecognized"


# ---- the graph JSON: strings that become Python ------------------------------------------------

_OPERATOR_TARGET = re.compile(r"torch\.ops\.(aten|prims|higher_order)\.[A-Za-z_]\w*(\.[A-Za-z_]\w*)?")
_SYMBOLIC_TARGETS = {
    *(f"_operator.{name}" for name in (
        "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod",
        "pow", "truediv", "and_", "or_", "lshift", "rshift", "getitem",
    )),
    "math.trunc",
    *(f"torch.{name}" for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")),
}
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Min", "Max", "Mod", "Abs", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "true", "false", "True", "False", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "floor", "ceiling", "sqrt", "Piecewise", "ExprCondPair", "BooleanTrue", "BooleanFalse",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator", "OpaqueUnaryFn_sqrt",
    "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
    # Symbol assumptions, written as keyword arguments
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero", "even", "odd",
}
_SYMPY_TOKEN = re.compile(
    r"\s+|\d+(\.\d+)?([eE][+-]?\d+)?|'[A-Za-z_]\w*'|[A-Za-z_]\w*|\*\*|[()+\-*/,=<>!%]"
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
_GUARD_CALLS = {
    "math.floor", "math.ceil", "math.trunc", "math.sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_max",
    "torch.sym_min", "max", "min", "abs", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless",
}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}


def _graph_code(raw: bytes, name: str) -> list[str]:
    """Every string of a serialized graph that would run as Python, or name an unknown callable."""
    try:
        graph = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"not JSON ({error})"]
    found: list[str] = []
    for guard in graph.get("guards_code", []) if isinstance(graph, dict) else []:
        if not isinstance(guard, str) or not _is_plain_guard(guard):
            found.append(f"guard code {_short(guard)} is not a plain shape check (it would run as Python)")
    for key, value in _walk(graph):
        if key == "expr_str" and (not isinstance(value, str) or not _is_plain_sympy(value)):
            found.append(f"symbolic expression {_short(value)} is not plain arithmetic (sympify would eval it)")
        elif key == "target" and isinstance(value, str) and not _is_operator(value):
            found.append(f"call target {_short(value)} is not an operator (it would be called when the graph runs)")
    return list(dict.fromkeys(found))


def _walk(value, key=None):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, key)
    else:
        yield key, value


def _is_operator(target: str) -> bool:
    return bool(_OPERATOR_TARGET.fullmatch(target)) or target in _SYMBOLIC_TARGETS


def _is_plain_sympy(text: str) -> bool:
    position = 0
    while position < len(text):
        match = _SYMPY_TOKEN.match(text, position)
        if match is None:
            return False
        token = match.group(0)
        is_name = token[0].isalpha() or token[0] == "_"
        if is_name and token not in _SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(token):
            return False
        position = match.end()
    return True


def _is_plain_guard(code: str) -> bool:
    try:
        tree = python_ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    return _plain_guard_node(tree.body)


def _plain_guard_node(node) -> bool:
    a = python_ast
    if isinstance(node, a.Constant):
        return isinstance(node.value, (int, float, bool))
    if isinstance(node, a.Compare):
        return _plain_guard_node(node.left) and all(map(_plain_guard_node, node.comparators))
    if isinstance(node, a.BoolOp):
        return all(map(_plain_guard_node, node.values))
    if isinstance(node, a.UnaryOp):
        return isinstance(node.op, (a.Not, a.USub, a.UAdd)) and _plain_guard_node(node.operand)
    if isinstance(node, a.BinOp):
        arithmetic = (a.Add, a.Sub, a.Mult, a.Div, a.FloorDiv, a.Mod, a.Pow)
        return isinstance(node.op, arithmetic) and _plain_guard_node(node.left) and _plain_guard_node(node.right)
    if isinstance(node, a.Subscript):  # L['x'] or ....size()[0]
        index = node.slice
        if isinstance(node.value, a.Name):
            return node.value.id == "L" and isinstance(index, a.Constant) and isinstance(index.value, str)
        return isinstance(index, a.Constant) and isinstance(index.value, int) and _plain_guard_node(node.value)
    if isinstance(node, a.Call):
        if node.keywords:
            return False
        function = node.func
        if isinstance(function, a.Attribute) and function.attr in _GUARD_METHODS and isinstance(function.value, a.Subscript):
            return not node.args and _plain_guard_node(function.value)
        return _dotted(function) in _GUARD_CALLS and all(map(_plain_guard_node, node.args))
    return False


def _dotted(node) -> str | None:
    if isinstance(node, python_ast.Name):
        return node.id
    if isinstance(node, python_ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
