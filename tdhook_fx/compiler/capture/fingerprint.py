"""The name of a persistent capture cache entry: a hash of everything a capture depends on.

The model's class and configuration (a Hugging Face config's entries, private ones included:
`_attn_implementation` picks another graph with the same outputs), each module's path, type,
mode, plain attributes and forward's bytecode, every parameter's and buffer's name, ties, dtype,
device, shape and `requires_grad`, the inputs' dtypes, devices and fixed sizes (the dynamic
ones of `export.dynamic_dims` left out), the keys, the front end, and the torch, tdhook_fx and
Python versions. About 7 ms on GPT-2 small.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata

import torch
from torch import nn

from tdhook_fx.compiler.capture.export import dynamic_dims

FORMAT = 2  # of the stored entries (`disk`, `stored_graph`): a new format makes new names


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
