"""tdhook's TensorDict operators (`tdhook.modules`): small modules that route keys between steps.

They hold no model state and install nothing: a `Workflow` step, or a method's own pipeline,
is built from them. `FunctionModule` wraps a function of a TensorDict; `ModuleCall` runs a
module on a sub-TensorDict (`in_key`) and stores its outputs under `out_key`;
`ModuleCallWithCache` also publishes a cache that the module fills through a shared
reference; `PGDModule` runs projected gradient steps on the keys a module's `_grad` holds;
`IntermediateKeysCleaner` drops keys. `flatten_select_reshape_call` runs a module on a
TensorDict flattened to one batch dimension, keeps its outputs and restores the batch shape.
"""

from __future__ import annotations

from collections.abc import Callable
from textwrap import indent

import torch
from tensordict import NonTensorData, TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase

from tdhook_fx.hooks import MutableWeakRef, TensorDictRef


def get_best_device() -> torch.device:
    """CUDA if available, then MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def flatten_select_reshape_call(
    module: TensorDictModuleBase, td: TensorDictBase, flatten: bool = True, select: bool = True, reshape: bool = True
) -> TensorDictBase:
    """`module` on `td` with its batch dims flattened into one; optionally only its out_keys, in `td`'s shape."""
    result = module(td.flatten() if flatten else td)
    if select:
        result = result.select(*module.out_keys)
    if reshape:
        result = result.reshape(td.shape)
    return result


def _nest(prefix, keys) -> list:
    return [key if prefix is None else (prefix, key) for key in keys]


def _describe(operator: TensorDictModuleBase, **fields) -> str:
    body = ",\n".join(f"{name}={value}" for name, value in fields.items())
    return f"{type(operator).__name__}(\n{indent(body, '    ')})"


class FunctionModule(TensorDictModuleBase):
    """A function of a TensorDict, as a module with declared `in_keys` and `out_keys`."""

    def __init__(self, td_fn: Callable[[TensorDictBase], TensorDictBase], in_keys: list, out_keys: list):
        super().__init__()
        self.in_keys = in_keys
        self.out_keys = out_keys
        self._td_fn = td_fn

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        return self._td_fn(td)

    def __repr__(self) -> str:
        return _describe(self, in_keys=self.in_keys, out_keys=self.out_keys, td_fn=self._td_fn)


class ModuleCall(TensorDictModuleBase):
    """`td_module` run on `td[in_key]` (or `td`); its outputs stored under `out_key` (or in `td`)."""

    def __init__(self, td_module: TensorDictModuleBase, in_key=None, out_key=None, flatten: bool = True):
        super().__init__()
        self.in_keys = _nest(in_key, td_module.in_keys)
        self.out_keys = _nest(out_key, td_module.out_keys)
        self._td_module = td_module
        self._in_key = in_key
        self._out_key = out_key
        self._flatten = flatten

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        source = td if self._in_key is None else td.get(self._in_key)
        outputs = flatten_select_reshape_call(self._td_module, source, flatten=self._flatten)
        if self._out_key is None:
            return td.update(outputs)
        existing = td.get(self._out_key, None)
        if isinstance(existing, TensorDictBase):
            existing.update(outputs)
        else:
            td.set(self._out_key, outputs)
        return td

    def __repr__(self) -> str:
        return _describe(self, td_module=self._td_module, in_keys=self.in_keys, out_keys=self.out_keys)


class ModuleCallWithCache(TensorDictModuleBase):
    """A `ModuleCall` that also publishes a cache the module fills through `cache_ref`.

    Before each call `cache_ref` is pointed at a fresh TensorDict (one flattened batch
    dimension, like the call's inputs); whatever the module stores in it during the call
    (`stored_keys`) ends up under `cache_key` in the call's TensorDict, in its batch shape.
    With `cache_as_output=False` the cache stays behind the reference (with its `_shape`).
    """

    def __init__(
        self,
        td_module: TensorDictModuleBase,
        stored_keys: list,
        cache_key=None,
        in_key=None,
        out_key=None,
        cache_ref: MutableWeakRef | TensorDictRef | None = None,
        flatten: bool = True,
        cache_as_output: bool = True,
    ):
        super().__init__()
        self.in_keys = _nest(in_key, td_module.in_keys)
        self.out_keys = _nest(out_key, td_module.out_keys) + (_nest(cache_key, stored_keys) if cache_as_output else [])
        self._td_module = td_module
        self._cache_key = cache_key
        self._in_key = in_key
        self._out_key = out_key
        self._flatten = flatten
        self._cache_as_output = cache_as_output
        self._cache_ref = cache_ref if cache_ref is not None else MutableWeakRef(TensorDict())

    @property
    def cache_ref(self) -> MutableWeakRef | TensorDictRef:
        return self._cache_ref

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        source = td if self._in_key is None else td.get(self._in_key)
        cache = TensorDict(batch_size=source.batch_size, device=source.device).flatten()
        self._cache_ref.set(cache)
        outputs = flatten_select_reshape_call(self._td_module, source, flatten=self._flatten)
        if self._out_key is None:
            td.update(outputs)
        else:
            td.set(self._out_key, outputs)
        if not self._cache_as_output:
            cache.set("_shape", NonTensorData(tuple(source.shape)))
        elif self._cache_key is None:
            td.update(cache.reshape(source.shape))
        else:
            td.set(self._cache_key, cache.reshape(source.shape))
        return td

    def __repr__(self) -> str:
        return _describe(self, td_module=self._td_module, in_keys=self.in_keys, out_keys=self.out_keys)


class PGDModule(TensorDictModuleBase):
    """`n_steps` of projected gradient descent (ascent) on the keys of `td_module`'s `grad_key` output.

    Each step runs `td_module` on the working TensorDict (`td[working_key]`, or `td`), then moves
    every key `k` of its `grad_key` entry: `k - alpha * sign(grad)` (`use_sign=False`: the
    gradient itself; `ascent=True`: the other way), clamped to `[min_value, max_value]`.
    """

    def __init__(
        self,
        td_module: TensorDictModuleBase,
        alpha: float = 0.1,
        n_steps: int = 10,
        min_value: float = -float("inf"),
        max_value: float = float("inf"),
        grad_key="_grad",
        working_key="_working",
        ascent: bool = False,
        use_sign: bool = True,
    ):
        super().__init__()
        self._td_module = td_module
        self.in_keys = td_module.in_keys
        self.out_keys = _nest(working_key, td_module.out_keys)
        self._alpha = alpha
        self._n_steps = n_steps
        self._min_value = min_value
        self._max_value = max_value
        self._grad_key = grad_key
        self._working_key = working_key
        self._ascent = ascent
        self._use_sign = use_sign

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        working = td if self._working_key is None else td.get(self._working_key)
        for _ in range(self._n_steps):
            working = self._step(self._td_module(working))
        if self._working_key is None:
            return td.update(working)
        td.set(self._working_key, working)
        return td

    def _step(self, td: TensorDictBase) -> TensorDictBase:
        grads = td.get(self._grad_key)
        for key in grads.keys(include_nested=True, leaves_only=True):
            grad = -grads.get(key) if self._ascent else grads.get(key)
            step = torch.sign(grad) if self._use_sign else grad
            td.set(key, torch.clamp(td.get(key) - self._alpha * step, min=self._min_value, max=self._max_value))
        return td

    def __repr__(self) -> str:
        return _describe(self, td_module=self._td_module, in_keys=self.in_keys, out_keys=self.out_keys)


class IntermediateKeysCleaner(TensorDictModuleBase):
    """Drops `intermediate_keys` from the TensorDict (a method's scratch entries)."""

    def __init__(self, intermediate_keys: list):
        super().__init__()
        self.in_keys = intermediate_keys
        self.out_keys = []
        self._intermediate_keys = intermediate_keys

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        return td.exclude(*self._intermediate_keys)

    def __repr__(self) -> str:
        return _describe(self, in_keys=self.in_keys, out_keys=self.out_keys)
