"""CompiledModule: the rewritten graph behind a TensorDict (or plain tensor) interface."""

from __future__ import annotations

import difflib

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.capture import Capture, SiteTable, key_name
from tdhook_fx.errors import BindingError, TdhookFxError
from tdhook_fx.ir import ResolvedProgram
from tdhook_fx.passes import Rewritten
from tdhook_fx.syntax.ast import variables

SAVED = "saved"


class CompiledModule(nn.Module):
    """A model with a program compiled into its graph: no hooks, printable, exportable.

    Call it with a TensorDict (model inputs at `in_keys`, runtime values `$name` at key
    `name`, patch sources at `(source, in_key)`): it writes the model outputs at `out_keys`
    and every saved value at `("saved", name)` into that TensorDict and returns it. Or call it
    with the input tensors (runtime values and patch sources as keywords): it returns a dict
    `{out_key: tensor, ..., "saved": {name: tensor}}`.
    """

    def __init__(self, capture: Capture, sites: SiteTable, resolved: ResolvedProgram, rewritten: Rewritten, training: bool):
        super().__init__()
        self.graph_module = rewritten.graph_module
        self.sites = sites
        self.resolved = resolved
        self.frontend = capture.frontend
        self.capture_seconds = capture.seconds
        self.in_keys = list(capture.plan.in_keys)
        self.out_keys = list(capture.plan.out_keys) if rewritten.returns_model_outputs else []
        self._rewritten = rewritten
        self._captured_training = training
        self._bound: dict[str, str] = {}  # runtime name -> buffer name
        self._functions: dict[str, object] = {}  # runtime name -> bound Python function
        self.train(training)

    # ---- what was compiled --------------------------------------------------------------------

    @property
    def program(self) -> str:
        """The program, in canonical DSL text."""
        return str(self.resolved.program)

    @property
    def code(self) -> str:
        """The rewritten forward, as Python."""
        return self.graph_module.code

    @property
    def graph(self):
        return self.graph_module.graph

    @property
    def runtime_names(self) -> tuple[str, ...]:
        return self._rewritten.runtime_names

    @property
    def saved_names(self) -> tuple[str, ...]:
        return self._rewritten.saved_names

    def __repr__(self) -> str:
        return f"CompiledModule(frontend={self.frontend!r}, program=\n{self.program}\n)"

    # ---- runtime values -----------------------------------------------------------------------

    def bind(self, **values) -> CompiledModule:
        """Set runtime values (`$name`) shared by every call; a TensorDict key of the same name wins.

        Tensors are stored as buffers, so changing them needs no recompilation; a Python
        function (for `$f(...)` or `patch ... with $f`) is kept as it is.
        """
        for name, value in values.items():
            if name not in self.runtime_names:
                raise BindingError(_unknown_name(name, self.runtime_names))
            if callable(value):
                self._functions[name] = value
                continue
            tensor = torch.as_tensor(value)
            buffer = f"bound_{name}"
            if name in self._bound:
                getattr(self, buffer).data = tensor
            else:
                self.register_buffer(buffer, tensor)
                self._bound[name] = buffer
        return self

    def _runtime(self, name: str, given) -> torch.Tensor:
        if given is not None:
            return given if callable(given) else torch.as_tensor(given)
        if name in self._functions:
            return self._functions[name]
        if name in self._bound:
            return getattr(self, self._bound[name])
        users = [i.describe() for i in self.resolved.interventions if name in variables(i.statement)]
        raise BindingError(
            f"no value for ${name}, which {'; '.join(dict.fromkeys(users))} needs\n"
            f"  hint: put it in the input TensorDict (td['{name}'] = value) or bind it once: cm.bind({name}=value)"
        )

    # ---- calling ------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self.training != self._captured_training:
            mode = "training" if self._captured_training else "eval"
            raise TdhookFxError(
                f"this module was compiled with the model in {mode} mode and is now in the other mode; "
                "the graph baked the mode in (dropout, batch norm)\n"
                f"  hint: call .{'train' if self._captured_training else 'eval'}() on it, or compile again "
                "after switching the model's mode"
            )
        if len(args) == 1 and not kwargs and isinstance(args[0], TensorDictBase):
            return self._call_tensordict(args[0])
        return self._call_tensors(args, kwargs)

    def _call_tensordict(self, td: TensorDictBase) -> TensorDictBase:
        inputs = [_get(td, key, "model input") for key in self.in_keys]
        runtime = [self._runtime(name, td.get(name, None)) for name in self.runtime_names]
        sources = [_get(td, (source, self.in_keys[i]), "patch source") for source, i in self._rewritten.source_inputs]
        outputs = self.graph_module(*inputs, *runtime, *sources)
        keys = [*self.out_keys, *((SAVED, name) for name in self.saved_names)]
        for key, value in zip(keys, outputs):
            _check_batch(td, key, value)
            td.set(key, value)
        return td

    def _call_tensors(self, args, kwargs) -> dict:
        if len(args) != len(self.in_keys):
            raise BindingError(
                f"expected {len(self.in_keys)} input tensor(s) ({', '.join(map(key_name, self.in_keys))}), got {len(args)}"
            )
        runtime = [self._runtime(name, kwargs.pop(name, None)) for name in self.runtime_names]
        sources = []
        for source in dict.fromkeys(s for s, _ in self._rewritten.source_inputs):
            if source not in kwargs:
                raise BindingError(f"the program patches from '{source}': pass {source}=(source inputs...)")
            given = kwargs.pop(source)
            sources.extend(given if isinstance(given, (tuple, list)) else (given,))
        if kwargs:
            raise BindingError(_unknown_name(next(iter(kwargs)), self.runtime_names))
        outputs = self.graph_module(*args, *runtime, *sources)
        result = dict(zip(map(key_name, self.out_keys), outputs))
        if self.saved_names:
            result[SAVED] = dict(zip(self.saved_names, outputs[len(self.out_keys) :]))
        return result


def _get(td: TensorDictBase, key, what: str) -> torch.Tensor:
    value = td.get(key, None)
    if value is None:
        raise BindingError(
            f"the input TensorDict has no {what} at key {key!r}; its keys: "
            f"{sorted(map(str, td.keys(include_nested=True, leaves_only=True)))}"
        )
    return value


def _check_batch(td: TensorDictBase, key, value: torch.Tensor) -> None:
    batch = tuple(td.batch_size)
    if tuple(value.shape[: len(batch)]) != batch:
        raise TdhookFxError(
            f"{key!r} has shape {tuple(value.shape)}, which does not start with the TensorDict's "
            f"batch size {list(batch)}, so it cannot be stored in it\n"
            "  hint: call with a TensorDict of batch_size=[] or with plain tensors (cm(*inputs))"
        )


def _unknown_name(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"the program's runtime values: {', '.join('$' + k for k in known) or 'none'}"
    return f"the program has no runtime value ${name}\n  hint: {hint}"


