"""The package's structure: no import cycles, every user error a TdhookFxError, one method framework."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import networkx as nx
import pytest

import tdhook_fx
import tdhook_fx.attribution
import tdhook_fx.latent
import tdhook_fx.weights
from tdhook_fx.contexts import HookingContext, HookingContextFactory
from tdhook_fx.modules import HookedModule

PACKAGE = Path(tdhook_fx.__file__).parent
MODULES = {
    name: path
    for path in PACKAGE.rglob("*.py")
    for name in [".".join(("tdhook_fx", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")]
}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports, anywhere in it (functions included); `from a import b`
    counts as importing `a.b` where that is a module, else `a`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def test_the_package_has_no_import_cycles():
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        graph.add_edges_from((name, imported) for imported in _imports(name, path))
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


BUILTIN_ERRORS = {"ValueError", "TypeError", "KeyError", "RuntimeError", "IndexError", "AttributeError", "Exception"}


def test_every_error_raised_for_users_is_a_tdhook_fx_error():
    # Raising a builtin error class directly is how a user's mistake escaped as a bare ValueError.
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in BUILTIN_ERRORS:
                    found.append(f"{name}:{node.lineno}: raise {node.exc.func.id}")
    assert not found, "\n".join(found)


def test_every_error_class_lives_in_errors_and_derives_from_tdhook_fx_error():
    outside = []
    for name in MODULES:
        if name == "tdhook_fx.__main__":  # runs the command line when imported
            continue
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == name:
                if name != "tdhook_fx.errors" and not attribute.startswith("_"):
                    outside.append(f"{name}.{attribute}")
    assert not outside, f"error classes outside tdhook_fx.errors: {outside}"
    errors = importlib.import_module("tdhook_fx.errors")
    classes = [v for v in vars(errors).values() if inspect.isclass(v) and issubclass(v, Exception) and v.__module__ == errors.__name__]
    assert all(issubclass(c, tdhook_fx.TdhookFxError) for c in classes)


def _methods():
    for package in (tdhook_fx.attribution, tdhook_fx.latent, tdhook_fx.weights):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    pending, seen = [HookingContextFactory], []
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            pending.append(sub)
            if not inspect.isabstract(sub) and sub.__module__.startswith(("tdhook_fx.attribution", "tdhook_fx.latent", "tdhook_fx.weights")):
                seen.append(sub)
    return sorted(set(seen), key=lambda c: c.__name__)


def test_every_method_is_a_hooking_context_factory_of_the_one_framework():
    names = {c.__name__ for c in _methods()}
    expected = {
        "ActivationAddition", "ActivationCaching", "ActivationMaximisation", "ActivationPatching", "Adapters",
        "GradCAM", "GuidedBackpropagation", "IntegratedGradients", "Probing", "Pruning", "Saliency", "SteeringVectors",
    }
    assert expected <= names


@pytest.mark.parametrize("build", [
    lambda: tdhook_fx.attribution.Saliency(),
    lambda: tdhook_fx.attribution.IntegratedGradients(),
    lambda: tdhook_fx.latent.ActivationCaching("0"),
    lambda: tdhook_fx.latent.SteeringVectors(["0"], lambda module_key, output: output),
    lambda: tdhook_fx.weights.Pruning(lambda **kw: kw["parameter"].abs(), amount_to_prune=0.5),
], ids=["Saliency", "IntegratedGradients", "ActivationCaching", "SteeringVectors", "Pruning"])
def test_prepare_returns_the_same_context_type_and_a_hooked_module(build):
    from torch import nn

    context = build().prepare(nn.Sequential(nn.Linear(3, 3)))
    assert isinstance(context, HookingContext)
    assert isinstance(context.module, HookedModule)
