"""The persistent capture cache: a capture made in an earlier process, read back in milliseconds.

Capturing a transformer takes seconds (torch.export). A capture is stored, as JSON written
only by tdhook_fx (`stored_graph`: the graph's nodes, never a weight, never pickle or code),
in `$XDG_CACHE_HOME/tdhook_fx/captures` (`~/.cache/...` by default), under a name hashed
from everything the capture depends on (`entry_name`): the model's class and configuration,
each module's type, mode, plain attributes and forward's bytecode, every parameter's and buffer's
name, dtype, device and shape, the inputs' dtypes, devices, ranks and fixed sizes, the keys,
the front end, and the torch, tdhook_fx and Python versions. `TDHOOK_FX_CAPTURE_CACHE=0`
turns it off.

A stored entry is hostile like any file: its size and nesting are bounded before it is
parsed, it is rebuilt only through `stored_graph`'s allow-list, and the caller uses it only
once the rebuilt graph reproduces the eager model's outputs and sites on the example (an
entry that decodes but computes something else is caught there). Whatever fails is ignored
and the entry is written anew by the capture that follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from torch import fx, nn

from tdhook_fx.compiler.capture import stored_graph
from tdhook_fx.compiler.capture.export import dynamic_dims
from tdhook_fx.compiler.capture.stored_graph import StoredGraphInvalid
from tdhook_fx.compiler.capture.taps import SiteKey

ENVIRONMENT = "TDHOOK_FX_CAPTURE_CACHE"  # "0": no persistent capture cache
FORMAT = 1
MAX_BYTES = 64 << 20
MAX_DEPTH = 48  # JSON nesting (a node's arguments are lists of lists, a few deep)


def enabled() -> bool:
    return os.environ.get(ENVIRONMENT, "1").strip() != "0"


def directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdhook_fx" / "captures"


def entry_name(model: nn.Module, inputs: tuple, in_keys, out_keys, frontend: str) -> str:
    """A hash of everything a capture of `model` on inputs like `inputs` depends on."""
    described = {
        "format": FORMAT,
        "versions": [torch.__version__, _own_version(), sys.version],
        "class": _qualified(type(model)),
        "config": _config(model),
        "modules": [
            [name, _qualified(type(m)), m.training, m.extra_repr(), _settings(m), _code(type(m))]
            for name, m in model.named_modules(remove_duplicate=False)
        ],
        "tensors": _tensors(model),
        "inputs": [[str(x.dtype), str(x.device), [None if d in dynamic_dims(x) else n for d, n in enumerate(x.shape)]] for x in inputs],
        "keys": [repr(tuple(in_keys)), repr(tuple(out_keys))],
        "frontend": frontend,
    }
    text = json.dumps(described, sort_keys=True, default=str)  # dtypes by name
    return hashlib.sha256(text.encode()).hexdigest()


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _config(model: nn.Module) -> dict | None:
    """A Hugging Face model's configuration, private settings included (`_attn_implementation`
    picks another graph with the same outputs and sites); other models: their modules' settings."""
    config = getattr(model, "config", None)
    return None if config is None else _plain(vars(config))


def _settings(module: nn.Module) -> dict:
    """A module's plain attributes (sizes, flags, names: what its forward may branch on)."""
    return _plain({k: v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")})


def _plain(values: dict) -> dict:
    """The entries of `values` that are plain data (nested dicts and lists of it, to a depth)."""
    return {str(k): v for k, v in values.items() if _is_plain(v, 0)}


def _is_plain(value, depth: int) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if depth < 4 and isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _code(cls: type) -> str:
    """A hash of `cls.forward`'s bytecode and names (a changed forward makes another entry)."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    if code is None:
        return ""
    return hashlib.sha256(code.co_code + repr((code.co_names, code.co_varnames)).encode()).hexdigest()


def _tensors(model: nn.Module) -> list:
    first: dict[int, str] = {}
    return [
        [name, first.setdefault(id(t), name), str(t.dtype), str(t.device), list(t.shape), t.requires_grad]
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    ]


def _own_version() -> str:
    try:
        return metadata.version("tdhook_fx")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- entries ----------------------------------------------------------------------------------


def save(name: str, graph_module: fx.GraphModule, frontend: str, site_keys: dict[str, SiteKey]) -> bool:
    """Store a capture under `name` (atomically: a reader sees the old entry or the new one);
    False when its graph is outside the stored format or the directory cannot be written."""
    guards = graph_module.meta.get("tdhook_fx_shape_guards") if frontend == "export" else []
    graph = stored_graph.encode(graph_module, guards)
    if graph is None:
        return False
    value = {
        "format": FORMAT,
        "frontend": frontend,
        "graph": graph,
        "sites": [[k.name, k.module, k.call, k.kind, k.item] for k in site_keys.values()],
    }
    folder = directory()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", suffix=".json", delete=False) as file:
            json.dump(value, file, separators=(",", ":"), allow_nan=False)
        os.replace(file.name, folder / f"{name}.json")
    except OSError:
        return False
    return True


def load(name: str, model: nn.Module) -> tuple[fx.GraphModule, str, dict[str, SiteKey]] | None:
    """The capture stored under `name`, rebuilt on `model`: (graph module, front end, site keys),
    or None where there is none or it is not valid (never raises for the entry's contents)."""
    path = directory() / f"{name}.json"
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except OSError:
        return None
    try:
        value = parse(raw)
        if not isinstance(value, dict) or set(value) != {"format", "frontend", "graph", "sites"}:
            raise StoredGraphInvalid("not a stored capture")
        if value["format"] != FORMAT or value["frontend"] not in ("fx", "export"):
            raise StoredGraphInvalid("another format or front end")
        sites = _sites(value["sites"])
        graph_module = stored_graph.decode(value["graph"], model)
    except (StoredGraphInvalid, RecursionError):
        return None
    return graph_module, value["frontend"], sites


def parse(raw: bytes):
    """JSON from `raw`, refused (`StoredGraphInvalid`) when too long, not UTF-8, nested deeper
    than `MAX_DEPTH` (counted before parsing) or holding NaN or infinities."""
    if len(raw) > MAX_BYTES:
        raise StoredGraphInvalid("too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StoredGraphInvalid("not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise StoredGraphInvalid("nested too deeply")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise StoredGraphInvalid("not JSON") from None


def _no_constant(name: str):
    raise StoredGraphInvalid(f"{name} in JSON")


def _depth(text: str) -> int:
    """The deepest nesting of brackets outside strings (JSON's strings escape quotes as \\")."""
    deepest = depth = 0
    inside = escaped = False
    for char in text:
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _sites(value) -> dict[str, SiteKey]:
    if not isinstance(value, list) or len(value) > stored_graph.MAX_NODES:
        raise StoredGraphInvalid("bad site list")
    keys = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise StoredGraphInvalid("bad site")
        name, module, call, kind, item = entry
        valid = (
            isinstance(name, str) and isinstance(module, str) and type(call) is int and call >= 0
            and kind in ("in", "out") and (item is None or type(item) in (int, str))
        )
        key = SiteKey(module, call, kind, item) if valid else None
        if key is None or key.name != name:
            raise StoredGraphInvalid("bad site")
        keys[name] = key
    return keys
