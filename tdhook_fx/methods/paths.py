"""tdhook module paths: parse them, find the modules they name, and turn them into DSL sites.

The method layer accepts tdhook's path syntax (`transformer.h.0.mlp`, `layers[5].mlp`,
`layers[-1]`, `d['q']`, `<odd/name>`, and tdhook 0.1.3's `[0]`) and tdhook's regex key
patterns (matched with `re.match` against dotted `named_modules()` names, the root excluded).
Paths are parsed without `eval`, resolved against the module tree, and the module found is
named by its dotted name inside the model that gets compiled; that name becomes a DSL `Path`
(built as an AST node, so odd names are escaped by the printer).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from tdhook_fx.errors import InvalidPattern, UnknownModulePath
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.regex import compile_pattern

_TOKEN = re.compile(
    r"""
    (?P<dot>\.)
  | (?P<name>[A-Za-z0-9_]+)
  | (?P<escaped><[^<>]+>)
  | \[\s*(?:(?P<int>-?\d+)|'(?P<squoted>[^']*)'|"(?P<dquoted>[^"]*)")\s*\]
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class ModuleRef:
    """A module named by the user (`key`, as tdhook would name it) and where it is compiled."""

    key: str  # the name results are stored under (the path as given, or the regex match)
    name: str  # dotted name inside the compiled model ("" is its root)
    module: nn.Module


def parse_path(path: str) -> list[str | int]:
    """Split a tdhook path into attribute names (str) and container indices (int)."""
    steps: list[str | int] = []
    position = 0
    while position < len(path):
        match = _TOKEN.match(path, position)
        if match is None:
            raise UnknownModulePath(
                f"invalid module path {path!r}: unexpected {path[position]!r} at position {position}\n"
                "  hint: write paths as tdhook does: "
                "'layers.0.mlp', 'layers[0].mlp', 'd[\"key\"]' or '<odd/name>'"
            )
        position = match.end()
        if match.group("dot"):
            continue
        if match.group("name") is not None:
            steps.append(match.group("name"))
        elif match.group("escaped") is not None:
            steps.append(match.group("escaped")[1:-1])
        elif match.group("int") is not None:
            steps.append(int(match.group("int")))
        else:
            steps.append(
                match.group("squoted") if match.group("squoted") is not None else match.group("dquoted")
            )
    return steps


def resolve_submodule(root: nn.Module, path: str) -> nn.Module:
    """The module `path` names under `root` (`""` is `root` itself)."""
    module = root
    walked: list[str] = []
    for step in parse_path(path):
        module = _step(root, module, step, walked, path)
        walked.append(str(step))
    return module


def _step(root: nn.Module, module: nn.Module, step: str | int, walked: list[str], path: str) -> nn.Module:
    children = module._modules
    if isinstance(step, int):
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise _unknown(
                root,
                path,
                f"{'.'.join(walked) or 'the model'} is a {type(module).__name__}; "
                f"[{step}] needs a ModuleList or Sequential",
            )
        names = list(children)
        if not -len(names) <= step < len(names):
            raise _unknown(
                root,
                path,
                f"{'.'.join(walked) or 'the model'} has {len(names)} elements; [{step}] is out of range",
            )
        return children[names[step]]
    if step in children and children[step] is not None:
        return children[step]
    if "module" in children and step in children["module"]._modules:  # a wrapper (TensorDictModule, DDP)
        return children["module"]._modules[step]
    where = ".".join(walked) or "the model"
    if module._parameters.get(step) is not None:  # never getattr: a property must not run
        raise _unknown(root, path, f"{where}.{step} is a parameter, not a module")
    raise _unknown(root, path, f"{where} has no submodule '{step}'")


def _unknown(root: nn.Module, path: str, reason: str) -> UnknownModulePath:
    dotted = ".".join(str(s) for s in _lenient_steps(path))
    names = [n for n, _ in root.named_modules() if n]
    close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.5)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"the model's modules include {', '.join(repr(n) for n in names[:5])}"
    )
    return UnknownModulePath(f"unknown module path {path!r}: {reason}\n  hint: {hint}")


def _lenient_steps(path: str) -> list:
    try:
        return parse_path(path)
    except UnknownModulePath:
        return [path]


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its dotted name in `model` (the first name of a shared module)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def refer(base: nn.Module, model: nn.Module, path: str) -> ModuleRef:
    """The module `path` names under `base`, located inside the compiled `model`."""
    module = resolve_submodule(base, path)
    name = module_names(model).get(id(module))
    if name is None:
        raise UnknownModulePath(
            f"module path {path!r} names a {type(module).__name__} outside the model being compiled\n"
            "  hint: name a submodule of the model"
        )
    return ModuleRef(path, name, module)


def match_modules(
    base: nn.Module,
    model: nn.Module,
    pattern: str,
    classes_to_hook: tuple = (nn.Module,),
    classes_to_skip: tuple = (),
) -> list[ModuleRef]:
    """Every submodule of `base` whose dotted name `re.match`es `pattern` (tdhook's rule).

    As in tdhook, the match is anchored at the start only (`"1"` also matches `"10"`: end a
    pattern with `$`), the root is never matched, and the class filters apply. Patterns match
    in linear time (`tdhook_fx.syntax.regex`: Python's syntax without backreferences or
    lookarounds), so no pattern can hang on long names.
    """
    try:
        compiled = compile_pattern(pattern)
    except InvalidPattern as error:
        hints = "".join(f"\n  hint: {hint}" for hint in error.hints)
        raise UnknownModulePath(f"invalid key pattern {pattern!r}: {error.reason}{hints}") from None
    names = module_names(model)
    found = []
    for key, module in base.named_modules():
        if not key or not compiled.match(key):
            continue
        if not isinstance(module, tuple(classes_to_hook)) or isinstance(module, tuple(classes_to_skip)):
            continue
        if id(module) in names:
            found.append(ModuleRef(key, names[id(module)], module))
    return found


def no_match_error(base: nn.Module, pattern: str) -> UnknownModulePath:
    names = [n for n, _ in base.named_modules() if n]
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else "patterns use re.match on dotted names such as " + ", ".join(repr(n) for n in names[:3])
    )
    return UnknownModulePath(
        f"key pattern {pattern!r} matches no module that the model calls\n  hint: {hint}"
    )


def dsl_path(name: str) -> ast.Path:
    """The DSL path of a dotted module name (odd segments are escaped when printed)."""
    return ast.Path(tuple(ast.Attr(segment) for segment in name.split(".")))

