"""A standalone `torch.export` archive (.pt2) of a compiled module, and a guarded way to load one.

`cm.export(path)` re-exports the rewritten graph behind a small wrapper whose `forward` takes
the model's inputs only (then any patch sources) and returns plain dicts:
`{out_key: tensor, ..., "saved": {name: tensor}}`. Runtime values are buffers of the
submodule `runtime` (`m.runtime.alpha`), holding the values bound with `cm.bind`: edit them
in the loaded module to change the intervention, no re-export needed. The archive loads with
`torch.export.load` alone: neither tdhook_fx nor the model's library (transformers) is needed.

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
import keyword
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.compiler.capture.export import dynamic_dims, widen
from tdhook_fx.errors import ExportError

SAVED = "saved"
MANIFEST = "tdhook_fx.json"  # an extra file of the archive: what was exported, as JSON text


# ---- export -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    """What `cm.export` wrote."""

    path: Path
    input_names: tuple[str, ...]
    runtime_buffers: tuple[str, ...]  # e.g. "runtime.alpha"
    static_dims: tuple[str, ...]  # dynamic dims that torch.export had to fix, in words

    def __str__(self) -> str:
        lines = [f"wrote {self.path}", f"  inputs: {', '.join(self.input_names)}"]
        if self.runtime_buffers:
            lines.append(f"  runtime values (editable buffers): {', '.join(self.runtime_buffers)}")
        lines.extend(f"  note: {note}" for note in self.static_dims)
        return "\n".join(lines)


class Standalone(nn.Module):
    """The rewritten graph behind model inputs only, runtime values as buffers, dicts out."""

    def __init__(self, cm, values: dict[str, torch.Tensor], input_names: tuple[str, ...]):
        super().__init__()
        self.rewritten = cm.graph_module
        self.runtime = nn.Module()
        for name in cm.runtime_names:
            try:
                self.runtime.register_buffer(name, values[name].detach().clone())
            except (KeyError, AttributeError) as error:
                raise ExportError(f"the runtime value ${name} cannot be a buffer name: {error}") from None
        self.runtime_names = tuple(cm.runtime_names)
        self.out_names = tuple(map(key_name, cm.out_keys))
        self.saved_names = tuple(cm.saved_names)
        self.model_inputs = len(cm.in_keys)
        self.input_names = input_names
        self.train(cm.training)

    def run(self, inputs: tuple) -> dict:
        model_inputs, sources = inputs[: self.model_inputs], inputs[self.model_inputs :]
        values = [getattr(self.runtime, name) for name in self.runtime_names]
        flat = self.rewritten(*model_inputs, *values, *sources)
        result = dict(zip(self.out_names, flat))
        if self.saved_names:
            result[SAVED] = dict(zip(self.saved_names, flat[len(self.out_names) :]))
        return result


def standalone_module(cm, input_names: tuple[str, ...]) -> Standalone:
    """A `Standalone` whose `forward` names its arguments (torch.export keeps the names)."""
    values = _bound_tensors(cm)
    params = ", ".join(input_names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.run(({params},))\n", namespace)  # noqa: S102
    cls = type("Standalone", (Standalone,), {"forward": namespace["forward"]})
    return cls(cm, values, input_names)


def export(cm, path: str | os.PathLike, *, example=None) -> ExportSummary:
    """Write `cm` as a standalone `.pt2` (see the module docstring); returns what was written.

    The batch dimension of every input (and the sequence dimension of integer inputs) stays
    dynamic, as in the capture. Refuses (ExportError) a program with bound Python functions
    or unbound runtime values, and an export that does not reproduce `cm`'s outputs.
    """

    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"name the archive *.pt2 (torch.export.load expects it), not {path.name!r}")
    if getattr(cm, "grad_names", ()):
        raise ExportError(
            f"the program saves gradients ({', '.join(cm.grad_names)}), which need a backward pass; "
            "a .pt2 holds the forward computation only\n"
            "  hint: export the program without `save grad`, or ship it with cm.save(path)"
        )
    inputs = cm.example(example)
    # patch sources: the example's inputs in another batch order (own tensors: export must not alias them)
    by_key = dict(zip(map(key_name, cm.in_keys), inputs))
    sources = tuple(by_key[key_name(key)].flip(0).clone() for _, key in cm.patch_inputs)
    names = _input_names(cm)
    module = standalone_module(cm, names)
    arguments = (*inputs, *sources)
    try:
        program = torch.export.export(
            module,
            tuple(widen(x) for x in arguments),
            dynamic_shapes=tuple(dynamic_dims(x) for x in arguments),
            strict=False,
        )
    except Exception as error:  # torch.export's failures are many; report the first line and the place
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(
            f"torch.export could not export the rewritten module: {type(error).__name__}: {first}\n"
            "  hint: a model or program whose computation depends on tensor values may not export; "
            "cm(...) still runs it, and cm.save(path) ships it"
        ) from error
    _check_reproduces(cm, program, arguments)
    program.example_inputs = None  # otherwise torch.export.save pickles them into the archive
    manifest = {
        "program": cm.program,
        "inputs": list(names),
        "in_keys": [key_name(k) for k in cm.in_keys],
        "out_keys": [key_name(k) for k in cm.out_keys],
        "saved": list(cm.saved_names),
        "runtime": {name: f"runtime.{name}" for name in cm.runtime_names},
    }
    try:
        torch.export.save(program, path, extra_files={MANIFEST: json.dumps(manifest)})
    except OSError as error:
        raise ExportError(f"could not write {path}: {error}") from None
    static = _static_dims(program, names, arguments)
    for note in static:
        warnings.warn(f"{path.name}: {note}", stacklevel=3)
    return ExportSummary(path, names, tuple(manifest["runtime"].values()), tuple(static))


def _bound_tensors(cm) -> dict[str, torch.Tensor]:
    bound = cm.bound_values()
    functions = [name for name in cm.runtime_names if callable(bound.get(name))]
    if functions:
        raise ExportError(
            f"the program calls the Python function(s) {', '.join('$' + f for f in functions)}, "
            "which a .pt2 cannot carry (it holds tensors and operators only)\n"
            "  hint: use cm.save(path) (functions are bound again after loading), or write the "
            "function's effect in the DSL"
        )
    missing = [name for name in cm.runtime_names if name not in bound]
    if missing:
        raise ExportError(
            f"no value bound for {', '.join('$' + m for m in missing)}; the .pt2 carries runtime "
            "values as buffers holding the bound values\n"
            f"  hint: cm.bind({missing[0]}=tensor) before exporting (editable in the loaded module)"
        )
    return {name: bound[name] for name in cm.runtime_names}


def _input_names(cm) -> tuple[str, ...]:
    names: list[str] = []
    for key in cm.in_keys:
        names.append(_identifier(key_name(key), names))
    by_key = dict(zip(map(key_name, cm.in_keys), names))
    for source, key in cm.patch_inputs:
        names.append(_identifier(f"{source}_{by_key[key_name(key)]}", names))
    return tuple(names)


def _identifier(text: str, taken: list[str]) -> str:
    name = re.sub(r"\W", "_", text) or "input"
    if name[0].isdigit() or keyword.iskeyword(name) or name == "self":
        name = f"_{name}"
    while name in taken:
        name += "_"
    return name


def _check_reproduces(cm, program, arguments: tuple) -> None:
    """Never silently wrong: the exported program must give cm's outputs on the example."""
    model_inputs = arguments[: len(cm.in_keys)]
    sources = arguments[len(cm.in_keys) :]
    with torch.no_grad():
        values = list(_bound_tensors(cm).values())
        want = cm.graph_module(*model_inputs, *values, *sources)
        got = program.module()(*arguments)
    flat_got = [*(got[name] for name in map(key_name, cm.out_keys)), *(got.get(SAVED, {}).values())]
    for name, a, b in zip([*map(key_name, cm.out_keys), *cm.saved_names], want, flat_got):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise ExportError(f"the exported program does not reproduce {name!r} on the example; nothing was written")


def _static_dims(program, names: tuple[str, ...], arguments: tuple) -> list[str]:
    """Dims meant to be dynamic that torch.export fixed (e.g. by a per-example runtime value)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    by_name = {n.name: n for n in placeholders}
    notes = []
    for name, placeholder_name, x in zip(names, user_inputs, arguments):
        shape = by_name[placeholder_name].meta["val"].shape
        for dim in dynamic_dims(x):
            if is_concrete_int(shape[dim]):
                what = "batch" if dim == 0 else "sequence"
                notes.append(
                    f"the {what} dimension of {name} is fixed to {shape[dim]} "
                    "(a runtime value or index of that size ties it)"
                )
    return notes


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
