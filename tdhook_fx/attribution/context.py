"""`Method(...).prepare(model)`: the context and the module it yields, as tdhook has them.

`with method.prepare(model, in_keys, out_keys) as hooked: td = hooked(td)`. Nothing is
installed on the model, on entering or ever: the method compiles a program for the model (on
the first call, from its inputs; cached per input signature) and calls the compiled module.
The context only guards that the module is used inside `with`, as tdhook's does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

import tdhook_fx
from tdhook_fx.compiler.capture import key_name
from tdhook_fx.compiler.compiled import GRAD_DELTA, SAVED
from tdhook_fx.compiler.pipeline import DEFAULT_IN_KEYS, DEFAULT_OUT_KEYS


@dataclass(frozen=True)
class ModelKeys:
    """Where the model's inputs are in the TensorDict, how the model takes them, where outputs go.

    `in_keys` may be a list (inputs passed in order) or a dict {forward keyword: TensorDict key}
    (tdhook's `in_keys={"inputs_embeds": "embeds"}`).
    """

    td_in_keys: tuple  # TensorDict keys of the inputs, in call order
    call_in_keys: tuple  # the in_keys the model is compiled with (keyword names for a dict)
    out_keys: tuple

    @classmethod
    def from_prepare(cls, in_keys, out_keys) -> ModelKeys:
        if isinstance(in_keys, dict):
            call, td = tuple(in_keys), tuple(in_keys.values())
        else:
            call = td = tuple(in_keys or DEFAULT_IN_KEYS)
        return cls(td, call, tuple(out_keys or DEFAULT_OUT_KEYS))


class MethodContext:
    """What `prepare` returns: a re-enterable context whose `__enter__` yields the module."""

    def __init__(self, method, model: nn.Module, keys: ModelKeys):
        self.entered = False
        self.module = AttributedModule(method, model, keys, self)

    def __enter__(self) -> AttributedModule:
        if self.entered:
            raise RuntimeError("Cannot enter a method context twice")
        self.entered = True
        return self.module

    def __exit__(self, *exc) -> bool:
        self.entered = False
        return False


class AttributedModule(TensorDictModuleBase):
    """The prepared model: `hooked(td)` writes the method's results into `td` and returns it.

    `in_keys` are the model inputs' TensorDict keys (what the metrics perturb); `out_keys` the
    keys the method writes.
    """

    def __init__(self, method, model: nn.Module, keys: ModelKeys, context: MethodContext):
        super().__init__()
        self.in_keys = list(keys.td_in_keys)
        self.out_keys = method.declared_out_keys(keys)
        self.model = model
        self.keys = keys
        self.method = method
        self._context = context
        self._compiled: dict = {}

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        self._check_in_context()
        return self.method.run(self, td)

    def outputs(self, td: TensorDictBase) -> TensorDictBase:
        """The model's outputs on `td`'s inputs, at ("_mod_out", out_key), without attributions.

        The metrics use it to evaluate perturbed inputs at the cost of a forward pass only.
        """
        self._check_in_context()
        return self.method.model_outputs(self, td)

    def _check_in_context(self) -> None:
        if not self._context.entered:
            raise RuntimeError(
                "Contextual HookedModule must be called in context\n"
                "  hint: with method.prepare(model) as hooked: td = hooked(td)"
            )

    # ---- the compiled program -----------------------------------------------------------------

    def compiled(self, inputs: tuple):
        """The method's program compiled for `model` on inputs like these (cached per signature)."""
        signature = tuple((x.dtype, x.dim(), x.device) for x in inputs)
        if signature not in self._compiled:
            self._compiled[signature] = self.method.compile(self, inputs)
        return self._compiled[signature]

    def compile_program(self, lines: list[str], inputs: tuple, bindings: dict | None = None):
        """`tdhook_fx.compile` this model with a program; runtime functions bound."""
        compiled = tdhook_fx.compile(
            self.model,
            "\n".join(lines),
            example=tuple(inputs),
            in_keys=list(self.keys.call_in_keys),
            out_keys=list(self.keys.out_keys),
        )
        if bindings:
            compiled.bind(**{k: v for k, v in bindings.items() if k in compiled.runtime_names})
        return compiled

    def sites(self, inputs: tuple):
        """The model's site table on inputs like these (`tdhook_fx.sites`)."""
        return tdhook_fx.sites(
            self.model, example=tuple(inputs), in_keys=list(self.keys.call_in_keys), out_keys=list(self.keys.out_keys)
        )

    def call(self, compiled, inputs: tuple) -> tuple[list[torch.Tensor], dict, dict]:
        """Run `compiled` on `inputs`: (model outputs in out_keys order, saved values, gradient inputs)."""
        result = compiled(*inputs)
        outputs = [result[key_name(k)] for k in self.keys.out_keys] if compiled.out_keys else []
        return outputs, result.get(SAVED, {}), result.get(GRAD_DELTA, {})

    def extra_repr(self) -> str:
        return f"method={type(self.method).__name__}, in_keys={self.in_keys}, out_keys={self.out_keys}"


def unwrap(model: nn.Module, in_keys, out_keys) -> tuple[nn.Module, object, object]:
    """A TensorDictModule becomes its inner module with its own keys (given keys are only checked)."""
    if not isinstance(model, TensorDictModuleBase):
        return model, in_keys, out_keys
    inner = getattr(model, "module", None)
    if not isinstance(inner, nn.Module):
        raise TypeError(
            f"cannot prepare a {type(model).__name__}: only plain modules and TensorDictModule are supported\n"
            "  hint: pass the underlying nn.Module with in_keys and out_keys"
        )
    for given, declared, what in ((in_keys, model.in_keys, "in_keys"), (out_keys, model.out_keys, "out_keys")):
        for key in given or ():
            if key not in declared:
                raise ValueError(f"Key {key} not in module.{what}")
    return inner, list(model.in_keys), list(model.out_keys)
