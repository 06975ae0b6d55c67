"""Taps: identity ops that mark, in the captured graph, the exact tensor of every site.

While a front end traces the model, `Tapper.enter`/`Tapper.exit` wrap each module call: every
tensor input and output goes through `tap(x, site_name)`, a registered custom op that both
torch.fx and torch.export keep as one node. The rewrite passes find sites by these nodes and
remove them at the end, so the final graph computes exactly what the model computes.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx, nn


@torch.library.custom_op("tdhook_fx::tap", mutates_args=())
def tap(x: torch.Tensor, site: str) -> torch.Tensor:
    """Identity that names the tensor `site` in a captured graph (removed after rewriting)."""
    return x.clone()


@tap.register_fake
def _(x, site):
    return torch.empty_like(x)


TAP = torch.ops.tdhook_fx.tap.default


def is_tap(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is TAP


@dataclass(frozen=True)
class SiteKey:
    """Where a site is: module, call, port kind and port item (None: the whole output)."""

    module: str
    call: int
    kind: str  # "out" | "in"
    item: int | str | None

    @property
    def name(self) -> str:
        base = self.module + (f"@{self.call}" if self.call else "")
        if self.kind == "out" and self.item is None:
            return base
        return f"{base}:{self.kind}" + (f".{self.item}" if self.item is not None else "")


def _is_tensor(value) -> bool:
    return isinstance(value, (torch.Tensor, fx.Proxy))


class Tapper:
    """Taps the inputs and outputs of every named module of `model` during one trace.

    With `mark=False` it only records which sites a run produces (used on the eager run), and
    with `record=True` also their values (to check a stored capture against).
    Only the thread that made the tapper taps: a forward of the same model in another thread
    while a capture runs passes through unchanged (and leaves the capture's record alone).
    """

    def __init__(self, model: nn.Module, mark: bool = True, record: bool = False):
        self.mark = mark
        self.values: dict[str, torch.Tensor] | None = {} if record else None  # site name -> its tensor (`record`)
        self.thread = threading.get_ident()
        self.names = {module: name for name, module in model.named_modules() if name}
        self.sites: list[SiteKey] = []
        self._calls: dict[str, int] = {}
        self._open: dict[str, list[int]] = {}

    def reset(self) -> None:
        """Start a new trace (a front end may run the model's forward more than once)."""
        self.sites.clear()
        self._calls.clear()
        self._open.clear()
        if self.values is not None:
            self.values.clear()

    def _tap(self, value, key: SiteKey):
        self.sites.append(key)
        if self.values is not None:
            self.values[key.name] = value.detach().clone()
        return tap(value, key.name) if self.mark else value

    @contextmanager
    def hooks(self):
        """Tap through temporary forward (pre-)hooks on every named module (removed on exit)."""
        handles = []
        for module in self.names:
            handles.append(module.register_forward_pre_hook(self.enter, with_kwargs=True))
            handles.append(module.register_forward_hook(lambda m, args, out: self.exit(m, out)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        name = self.names.get(module)
        if name is None or threading.get_ident() != self.thread:
            return args, kwargs
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self._open.setdefault(name, []).append(call)
        names = _positional_names(module, len(args))
        args = tuple(
            self._tap(a, SiteKey(name, call, "in", names[i])) if _is_tensor(a) else a
            for i, a in enumerate(args)
        )
        kwargs = {
            k: self._tap(v, SiteKey(name, call, "in", k)) if _is_tensor(v) else v
            for k, v in kwargs.items()
        }
        return args, kwargs

    def exit(self, module: nn.Module, output):
        name = self.names.get(module)
        if name is None or threading.get_ident() != self.thread:
            return output
        call = self._open[name].pop()
        if _is_tensor(output):
            return self._tap(output, SiteKey(name, call, "out", None))
        if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
            tapped = [
                self._tap(o, SiteKey(name, call, "out", i)) if _is_tensor(o) else o
                for i, o in enumerate(output)
            ]
            return type(output)(tapped)
        if isinstance(output, dict):  # includes Hugging Face ModelOutput (changed in place)
            for key, value in list(output.items()):
                if _is_tensor(value):
                    output[key] = self._tap(value, SiteKey(name, call, "out", key))
            return output
        return output


def _positional_names(module: nn.Module, count: int) -> list[int | str]:
    """Names of the first `count` positional parameters of `module.forward` (index if unnamed)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names: list[int | str] = []
    for i in range(count):
        p = parameters[i] if i < len(parameters) else None
        positional = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        names.append(p.name if positional else i)
    return names
