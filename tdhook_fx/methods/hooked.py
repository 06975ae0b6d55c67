"""`HookedModule`: a model behind a TensorDict interface whose interventions are compiled programs.

`HookedModule(model, in_keys, out_keys)` reads the model inputs from a TensorDict and writes
its outputs back, as tdhook's does. A method's `prepare(model)` makes one bound to the method
(usable only inside its `with` block); `hooked(td)` then runs the method's `forward`.
`hooked.run(td)` opens a block whose save/get/set/stop calls become one compiled program
(see `tdhook_fx.methods.run`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.errors import MethodUsageError
from tdhook_fx.methods.interface import ModelInterface
from tdhook_fx.methods.plain import as_tensordict, is_plain_call, plain_outputs
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult, execute, sites_for
from tdhook_fx.methods.run import HookedModuleRun

if TYPE_CHECKING:
    from tdhook_fx.methods.context import HookingContext, HookingContextFactory

# the statements of one pass: `extra(builder, table)` adds some, and may return `finish(result, td)`
Extra = Callable[[ProgramBuilder, SiteTable], Callable | None]


class HookedModule(TensorDictModuleBase):
    """A model behind a TensorDict interface whose interventions are compiled programs.

    Built directly (`HookedModule(model, in_keys=[...], out_keys=[...])`, usable anywhere) or
    by a method's `prepare(model)` (then only inside its `with` block). `hooked.compiled` is
    the `CompiledModule` of the last call and `hooked.code` its rewritten forward.
    """

    def __init__(
        self,
        module: nn.Module,
        in_keys=None,
        out_keys=None,
        *,
        hooking_context: HookingContext | None = None,
        method: HookingContextFactory | None = None,
    ):
        super().__init__()
        interface = ModelInterface.build(module, in_keys, out_keys)
        self.td_module = module
        self._interface = interface
        self._hooking_context = hooking_context
        self._method = method
        self.__dict__["_compiled"] = None  # not a submodule: the model is the only one
        keys = method.hooked_keys(interface) if method is not None else (interface.in_keys, interface.out_keys)
        self.in_keys, self.out_keys = list(keys[0]), list(keys[1])

    @classmethod
    def from_module(cls, module: nn.Module, in_keys, out_keys, **kwargs) -> HookedModule:
        return cls(module, in_keys, out_keys, **kwargs)

    @property
    def compiled(self):
        """The `CompiledModule` that the last call ran."""
        return self.__dict__["_compiled"]

    @property
    def interface(self) -> ModelInterface:
        return self._interface

    @property
    def hooking_context(self) -> HookingContext | None:
        return self._hooking_context

    @property
    def method(self) -> HookingContextFactory | None:
        """The method this module runs (None for a plain `HookedModule`)."""
        return self._method

    @property
    def code(self) -> str:
        """The rewritten forward that the last call ran."""
        return self._last().code

    @property
    def program(self) -> str:
        """The DSL program that the last call ran."""
        return self._last().program

    def _last(self):
        if self.compiled is None:
            raise MethodUsageError("nothing has been compiled yet: call the module (or a run) first")
        return self.compiled

    def _check_context(self) -> None:
        context = self._hooking_context
        if context is not None and not context.active:
            raise MethodUsageError("Contextual HookedModule must be called in context")

    @property
    def _active_method(self) -> HookingContextFactory | None:
        """The method, unless its context disabled it for a while (`disable_hooks()`)."""
        context = self._hooking_context
        if context is not None and context.disabled:
            return None
        return self._method

    def forward(self, *args, **kwargs):
        """`hooked(td)` runs the method on `td` and returns it; `hooked(*tensors)` (or keywords
        named after the in_keys) returns the model's outputs, as tdhook does."""
        self._check_context()
        if is_plain_call(args, kwargs):
            td = as_tensordict(self.in_keys, args, kwargs)
            return plain_outputs(self._run(td), self._interface.out_keys)
        return self._run(args[0] if args else kwargs["tensordict"])

    def _run(self, tensordict: TensorDictBase) -> TensorDictBase:
        method = self._active_method
        result = method.forward(self, tensordict) if method is not None else self.single_pass(tensordict)
        return self.finalize_tensordict(result)

    def finalize_tensordict(self, data: TensorDictBase) -> TensorDictBase:
        """Publish what the method owns after the call (tdhook's extension point; nothing here)."""
        return data

    # ---- what methods build on --------------------------------------------------------------------

    def sites(self, inputs: tuple) -> SiteTable:
        """The model's site table on `inputs` (captures and tables are cached by the compiler)."""
        return sites_for(self._interface, inputs)

    def execute(self, builder: ProgramBuilder, inputs: tuple, *, sources: dict | None = None) -> ProgramResult:
        """Compile (or reuse) `builder`'s program for `inputs`, run it once; `compiled` is then its module."""
        result = execute(self._interface, builder, inputs, sources=sources, source=self._source_name())
        self.__dict__["_compiled"] = result.compiled
        return result

    def single_pass(self, td: TensorDictBase, extra: Extra | None = None) -> TensorDictBase:
        """Run the active one-pass method's statements (plus `extra`'s) once on `td`; write the outputs."""
        inputs = self._interface.inputs(td)
        table = self.sites(inputs)
        builder = ProgramBuilder()
        finishers = []
        method = self._active_method
        if method is not None and method.single_pass:
            finishers.append(method.build(self, builder, table, td))
        if extra is not None:
            finishers.append(extra(builder, table))
        result = self.execute(builder, inputs)
        if result.outputs is not None:
            for key, value in result.outputs.items():
                td.set(key, value)
        for finish in finishers:
            if finish is not None:
                finish(result, td)
        return td

    def outputs(self, td: TensorDictBase) -> TensorDictBase:
        """The plain model's outputs on `td`'s inputs at `("_mod_out", out_key)`, without the method.

        One forward pass, no gradients (the attribution metrics evaluate perturbed inputs so).
        A TensorDict with several batch dims is flattened into one for the model and back.
        """
        self._check_context()
        batch = tuple(td.batch_size)
        inputs = tuple(x if len(batch) <= 1 else x.reshape(-1, *x.shape[len(batch):]) for x in self._interface.inputs(td))
        with torch.no_grad():
            outputs = self.execute(ProgramBuilder(), inputs).outputs or {}
        result = td.empty()
        for key, value in outputs.items():
            value = value if len(batch) <= 1 else value.reshape(*batch, *value.shape[1:])
            result.set(join_keys("_mod_out", key), value)
        return result

    def _source_name(self) -> str:
        method = self._active_method
        return f"{type(method).__name__} program" if method is not None else "run program"

    # ---- generation ---------------------------------------------------------------------------------

    def generate(self, inputs, max_new_tokens: int | None = None, **generation_kwargs) -> TensorDictBase:
        """Generate text with the method applied at every position the model computes (a KV cache).

        `inputs`: a TensorDict holding the in_keys (token ids, and an attention mask for left
        padding) or the token ids; `generation_kwargs` are `model.generate`'s (greedy,
        `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, ...), plus `compile=True` to
        run the decoding step under `torch.compile`. Returns a TensorDict with "sequences" and
        what the method writes (`ActivationCaching`: the cache over the whole sequence). See
        `tdhook_fx.generation.methods`.
        """
        from tdhook_fx.generation.methods import generate_hooked

        return generate_hooked(self, inputs, max_new_tokens, **generation_kwargs)

    # ---- run() --------------------------------------------------------------------------------------

    def run(
        self,
        data: TensorDictBase,
        cache: TensorDictBase | None = None,
        run_name: str | None = None,
        run_sep: str | None = None,
        run_cache: TensorDictBase | None = None,
        grad_enabled: bool = False,
        run_callback: Callable | None = None,
    ) -> HookedModuleRun:
        """A block whose save/get/set/stop calls become one compiled program, run on exit."""
        self._check_context()
        method = self._active_method
        if method is not None and not method.single_pass:
            raise MethodUsageError(
                f"run() cannot be combined with {type(method).__name__}, whose forward runs the model "
                "in several passes\n"
                "  hint: use HookedModule(model, in_keys, out_keys).run(...) for the low-level API"
            )
        return HookedModuleRun(self, data, cache, run_name, run_sep, run_cache, grad_enabled, run_callback)

    def __repr__(self) -> str:
        method = f", method={type(self._method).__name__}" if self._method is not None else ""
        model = type(self.td_module).__name__
        return f"{type(self).__name__}(module={model}, in_keys={self.in_keys}, out_keys={self.out_keys}{method})"
