"""tdhook's path grammar on any object (`tdhook.paths`): resolved without running anything.

`resolve_submodule_path(root, "layers[0].items['key']")` walks attributes (`name`, `.name`,
`<odd/name>`) and indices (`[3]`, `[-1]`, `[1:3]`, `['key']`). The whole path is parsed before
anything is read, so a call or an expression (`fn()`, `items[0] + 1`) is refused without touching
the object; attributes are read from instance dictionaries (registered modules first), never
through properties or other descriptors; only module containers and builtin lists, tuples and
dicts are indexed. A `DistributedDataParallel` root is its wrapped module.

The method layer resolves module paths with `tdhook_fx.methods.paths`, which walks modules only.
"""

from __future__ import annotations

import ast
import inspect
import re

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tdhook_fx.errors import InvalidArgumentType, UnknownModulePath

_NAME = re.compile(r"[A-Za-z0-9_]+")
_INT = re.compile(r"-?\d+")


def resolve_submodule_path(root: object, path: str) -> object:
    """The object `path` names under `root` (`""` is the root); see the module doc."""
    if not isinstance(path, str):
        raise InvalidArgumentType("submodule paths must be strings")
    current = root.module if isinstance(root, DistributedDataParallel) else root
    for kind, step in _parse(path):
        try:
            current = _attribute(current, step) if kind == "attribute" else _item(current, step)
        except (_StepError, AttributeError, IndexError, KeyError, TypeError) as error:
            raise UnknownModulePath(f"Invalid submodule path '{path}': {error}") from None
    return current


class _StepError(Exception):
    """One step of a path cannot be taken (reported as the whole path's UnknownModulePath)."""


def _fail(path: str, reason: str) -> UnknownModulePath:
    return UnknownModulePath(f"Invalid submodule path '{path}': {reason}")


def _parse(path: str) -> list[tuple[str, object]]:
    """The steps of `path`, parsed without looking at any object."""
    steps: list[tuple[str, object]] = []
    position, expecting, after_dot = 0, True, False
    while position < len(path):
        char = path[position]
        if char == "[":
            if after_dot:
                raise _fail(path, f"expected an attribute at {position}")
            position = _index(path, position, steps)
        elif char == "<":
            end = path.find(">", position + 1)
            if end < 0:
                raise _fail(path, "missing closing '>'")
            name = path[position + 1 : end]
            if not name or "<" in name:
                raise _fail(path, "invalid escaped attribute")
            steps.append(("attribute", name))
            position = end + 1
        elif char == "." and not expecting:
            position += 1
            expecting, after_dot = True, True
            continue
        elif expecting and _NAME.match(path, position):
            match = _NAME.match(path, position)
            steps.append(("attribute", match.group()))
            position = match.end()
        elif expecting:
            raise _fail(path, f"expected an attribute or index at {position}")
        else:
            raise _fail(path, f"unexpected character {char!r} at {position}")
        expecting, after_dot = False, False
    if expecting and path:
        raise _fail(path, "path cannot end with '.'")
    return steps


def _index(path: str, position: int, steps: list) -> int:
    """Parse `[...]` at `position` into `steps`; returns the position after it."""
    end, quote = position + 1, None
    while end < len(path):
        char = path[end]
        if quote is None and char in "\"'":
            quote = char
        elif quote is None and char == "]":
            break
        elif quote is not None and char == "\\":
            end += 1
        elif char == quote:
            quote = None
        end += 1
    else:
        raise _fail(path, "missing closing ']'")
    text = path[position + 1 : end]
    if _INT.fullmatch(text):
        steps.append(("index", int(text)))
    elif len(text) >= 2 and text[0] in "\"'" and text[-1] == text[0]:
        try:
            key = ast.literal_eval(text)  # a string literal only; nothing is evaluated
        except (SyntaxError, ValueError):
            raise _fail(path, "invalid string index") from None
        if not isinstance(key, str):
            raise _fail(path, "invalid string index")
        steps.append(("index", key))
    elif ":" in text:
        parts = text.split(":")
        if len(parts) > 3 or any(p and not _INT.fullmatch(p) for p in parts):
            raise _fail(path, "slices contain only integer bounds")
        steps.append(("index", slice(*(int(p) if p else None for p in parts))))
    else:
        raise _fail(path, "indexes must be integers, slices, or quoted strings")
    return end + 1


def _instance_dict(value: object) -> dict:
    try:
        found = object.__getattribute__(value, "__dict__")
    except AttributeError:
        return {}
    return found if isinstance(found, dict) else {}


def _attribute(current: object, name: str) -> object:
    modules = _instance_dict(current).get("_modules")
    if isinstance(modules, dict):
        if name in modules:
            return modules[name]
        if isinstance(modules.get("module"), nn.Module):  # a wrapper (TensorDictModule, DDP)
            return _attribute(modules["module"], name)
    value = inspect.getattr_static(current, name)
    if inspect.getattr_static(type(value), "__get__", None) is not None:
        raise _StepError(f"'{type(current).__name__}' has a descriptor attribute '{name}'")
    return value


def _item(current: object, index) -> object:
    if isinstance(current, nn.ModuleDict):
        if not isinstance(index, str):
            raise _StepError("ModuleDict indexes must be strings")
        return _instance_dict(current)["_modules"][index]
    if isinstance(current, (nn.ModuleList, nn.Sequential)):
        if isinstance(index, str):
            raise _StepError(f"{type(current).__name__} indexes must be integers or slices")
        return list(_instance_dict(current)["_modules"].values())[index]
    if isinstance(current, nn.Module):
        raise _StepError(f"'{type(current).__name__}' is not a positional module container")
    if type(current) in (dict, list, tuple):
        return current[index]
    raise _StepError(f"'{type(current).__name__}' is not a supported indexable container")


def submodule_path_to_name(path: str) -> str:
    """A path as a dotted name (`layers[0].mlp` -> `layers.0.mlp`); paths with negative indices,
    slices or parentheses are returned as they are."""
    if re.search(r"\[-|:|\(|\)", path):
        return path
    name = re.sub(r"[\"']", "", path)
    name = re.sub(r"[<>\[\]]", ".", name)
    return re.sub(r"\.+", ".", name).strip(".")


__all__ = ["resolve_submodule_path", "submodule_path_to_name"]
