"""How a TensorDict's `in_keys` call the model, and which outputs become `out_keys`.

`ModelCall` wraps the user's model into the module that a front end captures: it takes the
input tensors positionally (one graph input per in_key), calls the model as tdhook does, and
returns exactly the tensors of the out_keys as a flat tuple, so the captured graph needs no
output classes (Hugging Face `ModelOutput`) and drops outputs nobody asked for.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.errors import BindingError, CaptureError


@dataclass(frozen=True)
class CallPlan:
    """A model call, worked out once from the example."""

    in_keys: tuple
    out_keys: tuple
    keywords: tuple[str | None, ...]  # per in_key: the keyword it is passed as, or None
    picks: tuple[int | str | None, ...]  # per out_key: a sequence index, a mapping key, or None
    extra_kwargs: dict = field(default_factory=dict)

    @property
    def arg_names(self) -> tuple[str, ...]:
        """Python identifiers for the graph inputs, one per in_key."""
        return _identifiers(self.in_keys)

    def call(self, model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple:
        args = [x for x, kw in zip(inputs, self.keywords) if kw is None]
        kwargs = {kw: x for x, kw in zip(inputs, self.keywords) if kw is not None}
        output = model(*args, **kwargs, **self.extra_kwargs)
        return tuple(output if pick is None else output[pick] for pick in self.picks)


def key_name(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)


def join_keys(prefix, key) -> tuple:
    """("patched", "input") from "patched" and "input"; nested keys are flattened (tdhook's join_keys)."""
    prefix = prefix if isinstance(prefix, tuple) else (prefix,)
    key = key if isinstance(key, tuple) else (key,)
    return (*prefix, *key)


def check_written_keys(in_keys, out_keys, saved_names, sources=()) -> None:
    """A TensorDict call writes the out_keys and ("saved", name) for each saved value: no two of
    them may be the same key or hold one another ("saved" as an out_key would be replaced by the
    TensorDict of saved values), and none may hold an input key or sit inside one. Writing over
    an input key itself is allowed (inputs are read first), as in tdhook."""
    written = [("out_keys", _key_tuple(k)) for k in out_keys] + [("a saved value", ("saved", n)) for n in saved_names]
    read = [("in_keys", _key_tuple(k)) for k in in_keys] + [("a patch source", _key_tuple(k)) for k in sources]
    for i, (what, key) in enumerate(written):
        for j, (other_what, other) in enumerate(written[:i] + read):
            shorter, longer = sorted((key, other), key=len)
            overwrite = j >= i and key == other  # an output written over an input
            if longer[: len(shorter)] == shorter and not overwrite:
                raise BindingError(
                    f"the key {key_name(key)!r} ({what}) collides with {key_name(other)!r} ({other_what}): a TensorDict "
                    "call writes every output and saved value at its own key\n"
                    "  hint: rename one of them; saved values go to (\"saved\", name), so no in or out key may be "
                    "\"saved\" or (\"saved\", a saved name)"
                )


def _key_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def plan_call(model: nn.Module, in_keys, out_keys, inputs: Sequence[torch.Tensor]) -> tuple[CallPlan, tuple]:
    """Decide how to call `model` and pick its outputs; returns the plan and eager outputs."""
    parameters = _forward_parameters(model)
    by_name = all(isinstance(k, str) and k in parameters for k in in_keys)
    keywords = tuple(k if by_name else None for k in in_keys)
    extra = {"use_cache": False} if "use_cache" in parameters else {}
    with torch.no_grad():
        try:
            output = CallPlan(tuple(in_keys), tuple(out_keys), keywords, (None,), extra).call(model, inputs)[0]
        except Exception as error:  # the user's model failed on the user's example
            raise CaptureError(
                f"the model failed on the example inputs {list(map(key_name, in_keys))}: "
                f"{type(error).__name__}: {error}\n"
                "  hint: check in_keys (they are passed to forward "
                f"{'by name' if by_name else 'in order'}) and the example's shapes"
            ) from error
    picks = _picks(output, out_keys)
    plan = CallPlan(tuple(in_keys), tuple(out_keys), keywords, picks, extra)
    eager = tuple(output if pick is None else output[pick] for pick in picks)
    return plan, eager


def _forward_parameters(model: nn.Module) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _picks(output, out_keys) -> tuple:
    names = [key_name(k) for k in out_keys]
    if isinstance(output, torch.Tensor):
        if len(out_keys) != 1:
            raise CaptureError(
                f"the model returns one tensor but out_keys names {len(out_keys)}: {names}\n"
                "  hint: pass a single out_key, e.g. out_keys=['output']"
            )
        return (None,)
    if isinstance(output, Mapping):
        available = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        picks = []
        for key in out_keys:
            last = key[-1] if isinstance(key, tuple) else key
            if last not in available:
                raise CaptureError(
                    f"the model's output has no tensor '{last}'; its tensors are {available}\n"
                    f"  hint: out_keys=[{', '.join(repr(a) for a in available[:2])}]"
                )
            picks.append(last)
        return tuple(picks)
    if isinstance(output, (tuple, list)):
        if len(out_keys) > len(output):
            raise CaptureError(
                f"the model returns {len(output)} values but out_keys names {len(out_keys)}: {names}"
            )
        for i, key in enumerate(out_keys):
            if not isinstance(output[i], torch.Tensor):
                raise CaptureError(
                    f"out_key {key_name(key)!r} would be the model's output {i}, "
                    f"which is a {type(output[i]).__name__}, not a tensor"
                )
        return tuple(range(len(out_keys)))
    raise CaptureError(f"the model returns a {type(output).__name__}; tdhook_fx needs tensors, tuples or dicts")


def _identifiers(keys) -> tuple[str, ...]:
    names: list[str] = []
    for key in keys:
        names.append(python_name(key_name(key), names))
    return tuple(names)


# What a generated forward refers to by name: Python's builtins (getattr, slice), the globals
# torch.fx's generated code imports, and the functions of tdhook_fx it calls (as
# `tdhook_fx_compiler_passes_ops_fit`). A parameter of that name would hide it. `input`,
# tdhook's default key, is a builtin that no graph calls: it stays as it is.
_FX_GLOBALS = {"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree"}
_RESERVED = {"self", "__debug__", *_FX_GLOBALS, *dir(builtins)} - {"input"}


def python_name(text: str, taken=()) -> str:
    """A valid parameter name for a generated forward, made from `text` (a key), not in `taken`.

    Refuses nothing: each character outside A-Z, a-z, 0-9 and `_` becomes `_` (non-ASCII ones
    too, as Python would fold some of them into others); a name that is empty, starts with a
    digit, is a keyword or would hide a name the generated code uses (`self`, builtins,
    `torch`, `__debug__`) gets a leading `_`; a taken name gets trailing `_`s.
    """
    name = re.sub(r"[^A-Za-z0-9_]", "_", text) or "input"
    while True:
        if name[0].isdigit() or keyword.iskeyword(name) or name in _RESERVED or name.startswith("tdhook_fx"):
            name = f"_{name}"
        elif name in taken:
            name += "_"
        else:
            return name


class ModelCall(nn.Module):
    """The module a front end captures: named tensor inputs in, a flat tuple of outputs out."""

    def __init__(self, model: nn.Module, plan: CallPlan, on_enter=None):
        super().__init__()
        self.model = model
        self.plan = plan
        self._on_enter = on_enter

    def run(self, inputs: tuple) -> tuple:
        if self._on_enter is not None:
            self._on_enter()
        return self.plan.call(self.model, inputs)


def model_call(model: nn.Module, plan: CallPlan, on_enter=None) -> ModelCall:
    """A `ModelCall` whose `forward` has one named argument per in_key (fx names inputs so)."""
    names = plan.arg_names
    namespace: dict = {}
    params = ", ".join(names)
    exec(f"def forward(self, {params}):\n    return self.run(({params},))\n", namespace)  # noqa: S102
    cls = type("ModelCall", (ModelCall,), {"forward": namespace["forward"]})
    return cls(model, plan, on_enter)


def example_inputs(example, in_keys) -> tuple[torch.Tensor, ...]:
    """The model inputs in `example`: a TensorDict holding the in_keys, or the tensors in order."""
    if isinstance(example, TensorDictBase):
        missing = [key_name(k) for k in in_keys if example.get(k, None) is None]
        if missing:
            raise BindingError(
                f"the example TensorDict has no {', '.join(map(repr, missing))}; "
                f"its keys: {sorted(map(key_name, example.keys(include_nested=True, leaves_only=True)))}\n"
                "  hint: pass in_keys=[...] naming the model's inputs (Hugging Face: in_keys=['input_ids'])"
            )
        return tuple(example.get(k) for k in in_keys)
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if len(inputs) != len(in_keys) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise BindingError(f"the example must be a TensorDict or {len(in_keys)} tensor(s), one per in_key")
    return inputs
