"""`hooked.run(td)`: a block whose save/get/set/stop calls become one compiled program.

    with hooked.run(td, grad_enabled=False) as run:
        proxy = run.save("transformer.h.0.mlp")     # -> save transformer.h.0.mlp as saved_0
        run.set("transformer.h.1.mlp", v)           # -> set transformer.h.1.mlp = $value_0
        run.stop("transformer.h.1")                 # -> stop transformer.h.1
    proxy.resolve()                                 # the tensor, after the block

On exit the recorded calls become one DSL program, compiled (once per program text and input
signature; see `tdhook_fx.methods.programs.PROGRAMS`) and run. The semantics follow tdhook 0.1.3's
hooks: a `save`/`get` keeps the value of the module's last call, a `set` applies to every
call, statements at one module apply in the order they were recorded (`prepend=True` puts one
first), and after a `stop` nothing later runs and the TensorDict gets no outputs.

The gradient variants compile to `save grad` / `set grad` statements: `save_grad` reads the
gradient at the module's inputs (tdhook's grad_input), `save_grad_output` at its output;
`set_grad*` replace them. Their proxies are filled after `run_callback` (which must call
`.backward()`); a backward hook's last firing is the module's first call, so that call is read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.errors import InvalidArgument, MethodUsageError, TdhookFxError
from tdhook_fx.methods.paths import ModuleRef, refer
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reads import (
    DIRECTION_TO_TYPE,
    FORWARD_PORT,
    GRAD_PORT,
    add_read,
    add_replace,
    dsl_site,
    grad_callback,
    ports,
    save_inputs,
    unpack,
)
from tdhook_fx.syntax import ast

if TYPE_CHECKING:
    from tdhook_fx.methods.hooked import HookedModule


class CacheProxy:
    """A value that a run will put in a cache; `.resolve()` reads it (None if it never came)."""

    def __init__(self, key: str, cache: TensorDictBase):
        self._key = key
        self._cache = weakref.ref(cache)

    @property
    def key(self) -> str:
        return self._key

    def resolve(self) -> Any:
        cache = self._cache()
        if cache is None:
            raise InvalidArgument("Dead reference to cache: the run (and its cache) this proxy reads from is gone")
        return cache.get(self._key, None)

    def __repr__(self) -> str:
        return f"CacheProxy({self._key!r})"


# ---- one recorded call of a run ---------------------------------------------------------------------


@dataclass
class _Operation:
    kind: str  # "read" (save/get), "set" or "stop"
    ref: ModuleRef
    direction: str = "fwd"
    cache: TensorDictBase | None = None
    cache_key: str | None = None
    callback: Callable | None = None
    value: Any = None
    proxy: CacheProxy | None = None


class HookedModuleRun:
    """The `with hooked.run(td) as run:` block (tdhook 0.1.3's `HookedModuleRun`)."""

    def __init__(
        self,
        module,
        data,
        cache=None,
        run_name=None,
        run_sep=None,
        run_cache=None,
        grad_enabled=False,
        run_callback=None,
    ):
        self._module = module
        self._data = data
        self._outer_cache = cache
        self._name = run_name or "run"
        self._sep = run_sep or "."
        self._cache = TensorDict() if run_cache is None else run_cache
        self._grad_enabled = grad_enabled
        self._run_callback = run_callback or (lambda module, data: module(data))
        self._operations: list[_Operation] = []
        self._in_context = False
        self._grad_reads: list = []  # (program result, reads) whose gradients come after the callback

    @property
    def cache(self) -> TensorDictBase:
        return self._cache

    @cache.setter
    def cache(self, cache: TensorDictBase) -> None:
        self._cache = cache

    @property
    def _save_cache(self) -> TensorDictBase:
        return self._cache if self._outer_cache is None else self._outer_cache

    def __enter__(self) -> HookedModuleRun:
        self._in_context = True
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self._in_context = False
        if exc_type is not None:
            return False
        with torch.set_grad_enabled(self._grad_enabled):
            self._run_callback(_RunModule(self), self._data)
        for result, reads in self._grad_reads:
            grads = result.read_grads()
            if grads is None:
                continue  # no backward reached them (tdhook: the backward hooks never fired)
            for operation, read in reads:
                value = read.value(grads)
                if value is not None:
                    operation.cache.set(operation.cache_key, value)
        self._grad_reads = []
        return False

    def _ensure_in_context(self, method: str) -> None:
        if not self._in_context:
            raise MethodUsageError(
                f"Not in context, method {method} must be called in context or directly on the module"
            )

    def _ref(self, key: str, relative: bool) -> ModuleRef:
        interface = self._module.interface
        return refer(interface.base(relative), interface.model, key)

    def _record(self, operation: _Operation, prepend: bool) -> None:
        if operation.direction not in DIRECTION_TO_TYPE:
            raise InvalidArgument(f"Invalid direction: {operation.direction}")
        if operation.direction in GRAD_PORT:
            self._grad_enabled = True  # (tdhook 0.1.3 forgets this for the *_grad_output variants)
        if prepend:
            self._operations.insert(0, operation)
        else:
            self._operations.append(operation)

    # ---- the tdhook calls ---------------------------------------------------------------------

    def set(self, key, value, *, callback=None, direction="fwd", prepend=False, relative=True) -> None:
        self._ensure_in_context("set")
        self._record(
            _Operation("set", self._ref(key, relative), direction, callback=callback, value=value), prepend
        )

    def get(
        self, key, *, cache_key=None, callback=None, direction="fwd", prepend=False, relative=True
    ) -> CacheProxy:
        self._ensure_in_context("get")
        cache_key = cache_key or f"{key}_{DIRECTION_TO_TYPE.get(direction, direction)}"
        return self._read(key, self._cache, cache_key, callback, direction, prepend, relative)

    def save(
        self, key, *, cache_key=None, callback=None, direction="fwd", prepend=False, relative=True
    ) -> CacheProxy:
        self._ensure_in_context("save")
        cache_key = cache_key or f"{self._name}{self._sep}{key}_{DIRECTION_TO_TYPE.get(direction, direction)}"
        return self._read(key, self._save_cache, cache_key, callback, direction, prepend, relative)

    def _read(self, key, cache, cache_key, callback, direction, prepend, relative) -> CacheProxy:
        proxy = CacheProxy(cache_key, cache)
        operation = _Operation(
            "read", self._ref(key, relative), direction, cache, cache_key, callback, proxy=proxy
        )
        self._record(operation, prepend)
        return proxy

    def stop(self, key, *, relative=True) -> None:
        self._ensure_in_context("stop")
        self._record(_Operation("stop", self._ref(key, relative)), prepend=False)

    def set_input(self, *args, **kwargs) -> None:
        kwargs["direction"] = "fwd_pre"
        self.set(*args, **kwargs)

    def get_input(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "fwd_pre"
        return self.get(*args, **kwargs)

    def save_input(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "fwd_pre"
        return self.save(*args, **kwargs)

    def set_grad(self, *args, **kwargs) -> None:
        kwargs["direction"] = "bwd"
        self.set(*args, **kwargs)

    def get_grad(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "bwd"
        return self.get(*args, **kwargs)

    def save_grad(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "bwd"
        return self.save(*args, **kwargs)

    def set_grad_output(self, *args, **kwargs) -> None:
        kwargs["direction"] = "bwd_pre"
        self.set(*args, **kwargs)

    def get_grad_output(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "bwd_pre"
        return self.get(*args, **kwargs)

    def save_grad_output(self, *args, **kwargs) -> CacheProxy:
        kwargs["direction"] = "bwd_pre"
        return self.save(*args, **kwargs)

    # ---- the program -----------------------------------------------------------------------------

    def _statements(self, builder: ProgramBuilder, table) -> Callable:
        """Add this run's statements to `builder`; returns the step that fills the caches."""
        reached = _Reach(self._operations, table)
        pending: dict[int, str] = {}  # id(proxy) -> saved name, for proxies read in this run
        reads, grad_reads = [], []
        for index, operation in enumerate(self._operations):
            ref = operation.ref
            if operation.kind == "read" and operation.direction in GRAD_PORT:
                runs = reached.calls(operation, index)
                if runs:
                    grad_reads.append((operation, _add_grad_read(builder, table, operation, runs)))
            elif operation.kind == "read":
                runs = reached.calls(operation, index)
                if not runs:
                    continue  # the module never runs (before a stop): the proxy resolves to None
                read = add_read(
                    builder,
                    table,
                    ref.key,
                    ref.name,
                    ref.module,
                    operation.direction,
                    operation.callback,
                    call=runs[-1],
                    key=operation.cache_key,
                )
                if read is not None:
                    reads.append((operation, read))
                    if len(read.names) == 1 and operation.callback is None:
                        pending[id(operation.proxy)] = read.names[0]
            elif operation.kind == "set" and operation.direction in GRAD_PORT:
                _add_grad_set(builder, table, operation, pending, reached.calls(operation, index))
            elif operation.kind == "set":
                _add_set(builder, table, operation, pending, reached.calls(operation, index))
            elif operation is reached.stop:
                builder.add(ast.Stop(dsl_site(table, ports(table, ref.name, "out")[0])))

        def fill_caches(result, td) -> None:
            for operation, read in reads:
                operation.cache.set(operation.cache_key, read.tensor(result.saved))
            if grad_reads:
                self._grad_reads.append((result, grad_reads))

        return fill_caches


class _RunModule:
    """What a run's `run_callback(module, data)` gets: calling it runs the compiled program."""

    def __init__(self, run: HookedModuleRun):
        self._run = run

    @property
    def hooked_module(self) -> HookedModule:
        return self._run._module

    def __call__(self, data: TensorDictBase) -> TensorDictBase:
        return self._run._module.single_pass(data, extra=self._run._statements)

    forward = __call__


class _Reach:
    """Which module calls a run's hooks would see: tdhook's stop ends the forward where it fires."""

    def __init__(self, operations: list[_Operation], table):
        self.table = table
        stops = [(i, o) for i, o in enumerate(operations) if o.kind == "stop" and table.calls(o.ref.name)]
        self.stop = None
        if stops:
            self.position, self.stop = min(stops, key=lambda item: (self._stop_order(item[1]), item[0]))
            self.order = self._stop_order(self.stop)

    def _stop_order(self, operation: _Operation) -> int:
        return ports(self.table, operation.ref.name, "out")[0].order

    def calls(self, operation: _Operation, index: int) -> list[int]:
        """The calls of the operation's module whose values exist before the stop."""
        kind = _port(operation.direction)
        reached = []
        for call in range(self.table.calls(operation.ref.name)):
            sites = ports(self.table, operation.ref.name, kind, call)
            if sites and (self.stop is None or all(self._before(s.order, index) for s in sites)):
                reached.append(call)
        return reached

    def _before(self, order: int, index: int) -> bool:
        return order < self.order or (order == self.order and index < self.position)


def _add_set(builder: ProgramBuilder, table, operation: _Operation, pending: dict, runs: list[int]) -> None:
    """`set` at every call of the module that runs (tdhook's hook fires at each call)."""
    name = operation.ref.name
    kind = FORWARD_PORT[operation.direction]
    value = operation.value
    if isinstance(value, CacheProxy) and id(value) not in pending:
        value = value.resolve()  # from an earlier run: its value now
        if value is None and operation.callback is None:
            return  # tdhook: a None value keeps the original
    for call in runs:
        sites = ports(table, name, kind, call)
        if operation.callback is not None:
            _add_set_callback(builder, table, operation, value, pending, call)
            continue
        if isinstance(value, CacheProxy):
            expressions = [ast.Saved(pending[id(value)])]
        elif kind == "in":
            parts = _positional(sites, value, operation.ref.key)
            expressions = [builder.var("value", part) for part in parts]
        else:
            parts = unpack(sites, value, f"the value set at {operation.ref.key}")
            expressions = [builder.var("value", part) for part in parts]
        for site, expression in zip(sites, expressions):
            builder.add(ast.Set(dsl_site(table, site), expression))


def _positional(sites, value, key: str) -> list:
    """A module's new inputs: a tuple (tdhook's `args`) or, for one input, a tensor."""
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(values) != len(sites):
        raise TdhookFxError(
            f"set_input at {key}: the module takes {len(sites)} tensor input(s), "
            f"the value gives {len(values)}\n"
            "  hint: pass a tuple with one tensor per input, as tdhook's args"
        )
    return values


def _add_set_callback(builder, table, operation: _Operation, value, pending, call: int) -> None:
    """`set SITE = $f(value, ...)`: the callback runs inside the compiled graph."""
    module, callback, direction = operation.ref.module, operation.callback, operation.direction
    kind = FORWARD_PORT[direction]
    arguments: list = []
    if isinstance(value, CacheProxy):
        arguments.append(ast.Saved(pending[id(value)]))
    elif value is not None:
        arguments.append(builder.var("value", value))
    has_value = value is not None
    if kind == "out":
        arguments.extend(save_inputs(builder, table, operation.ref.name, call))

    def set_with_callback(current, *rest):
        given = rest[0] if has_value else None
        args = tuple(rest[1:] if has_value else rest)
        if kind == "out":
            return callback(module=module, args=args, output=current, value=given, direction=direction)
        result = callback(module=module, args=(current,), value=given, direction=direction)
        return result[0] if isinstance(result, tuple) else result

    add_replace(
        builder,
        table,
        operation.ref.key,
        operation.ref.name,
        call,
        set_with_callback,
        *arguments,
        prefix="set_fn",
        kind=kind,
    )


# ---- gradients (the _grad and _grad_output variants) ---------------------------------------------


def _port(direction: str) -> str:
    return GRAD_PORT[direction] if direction in GRAD_PORT else FORWARD_PORT[direction]


def _grad_sites(table, name: str, kind: str, call: int) -> list:
    """A module call's sites that carry gradients (floating point: no gradient reaches token ids)."""
    return [s for s in ports(table, name, kind, call) if s.dtype.is_floating_point or s.dtype.is_complex]


@dataclass
class _GradRead:
    """`save grad` statements for a backward hook's values, per module call: the gradients at the
    call's inputs (tdhook's grad_input) and outputs (grad_output)."""

    operation: _Operation
    calls: list  # per call: (input grad names, output grad names)

    def value(self, grads: dict):
        """What the backward hook would have cached last; None where the backward never reached it.

        The backward runs the calls in reverse, so the hook's last firing is the earliest call
        that the backward reached.
        """
        for input_names, output_names in self.calls:
            if all(grads[n] is not None for n in (*input_names, *output_names)):
                return self._hook_value(
                    tuple(grads[n] for n in input_names), tuple(grads[n] for n in output_names)
                )
        return None

    def _hook_value(self, grad_input: tuple, grad_output: tuple):
        operation = self.operation
        kwargs = {
            "module": operation.ref.module,
            "key": operation.cache_key,
            "direction": operation.direction,
        }
        if operation.callback is not None:
            if operation.direction == "bwd":
                return operation.callback(grad_input=grad_input, grad_output=grad_output, **kwargs)
            return operation.callback(grad_output=grad_output, **kwargs)
        chosen = grad_input if operation.direction == "bwd" else grad_output
        if len(chosen) == 1:
            return chosen[0]
        what = "inputs" if operation.direction == "bwd" else "outputs"
        raise TdhookFxError(
            f"{operation.ref.key} has {len(chosen)} tensor {what}, so its gradient is a tuple; "
            "a cache holds one tensor\n"
            "  hint: pass a callback that picks one, e.g. callback=lambda **kw: kw['grad_input'][0]"
        )


def _add_grad_read(builder: ProgramBuilder, table, operation: _Operation, runs: list[int]) -> _GradRead:
    name = operation.ref.name
    wants_inputs = operation.direction == "bwd"
    wants_outputs = operation.direction == "bwd_pre" or operation.callback is not None
    per_call = []
    for call in runs:
        inputs = _grad_sites(table, name, "in", call) if wants_inputs else []
        outputs = _grad_sites(table, name, "out", call) if wants_outputs else []
        per_call.append(
            (
                [_save_grad(builder, table, s) for s in inputs],
                [_save_grad(builder, table, s) for s in outputs],
            )
        )
    return _GradRead(operation, per_call)


def _save_grad(builder: ProgramBuilder, table, site) -> str:
    name = builder.name("grad")
    builder.add(ast.Save(dsl_site(table, site), name, grad=True))
    return name


def _add_grad_set(
    builder: ProgramBuilder, table, operation: _Operation, pending: dict, runs: list[int]
) -> None:
    """`set grad SITE = ...` at every call: the gradient that flows back through the module's inputs
    (set_grad, tdhook's grad_input) or into its outputs (set_grad_output)."""
    value = operation.value
    if isinstance(value, CacheProxy) and id(value) not in pending:
        value = value.resolve()
        if value is None and operation.callback is None:
            return
    kind = GRAD_PORT[operation.direction]
    for call in runs:
        sites = _grad_sites(table, operation.ref.name, kind, call)
        if operation.callback is not None:
            _add_grad_set_callback(builder, table, operation, sites, value, pending)
            continue
        if isinstance(value, CacheProxy):
            expressions = [ast.Saved(pending[id(value)])]
        else:
            parts = _positional(sites, value, operation.ref.key)
            expressions = [builder.var("grad_value", part) for part in parts]
        for site, expression in zip(sites, expressions):
            builder.add(ast.Set(dsl_site(table, site), expression, grad=True))


def _add_grad_set_callback(builder, table, operation: _Operation, sites, value, pending) -> None:
    if len(sites) != 1:
        raise TdhookFxError(
            f"a {operation.direction} callback at {operation.ref.key} would replace {len(sites)} gradients "
            "at once; callbacks are supported where the module has one tensor input (set_grad) "
            "or output (set_grad_output)"
        )
    arguments: list = [ast.SiteValue()]
    if isinstance(value, CacheProxy):
        arguments.append(ast.Saved(pending[id(value)]))
    elif value is not None:
        arguments.append(builder.var("grad_value", value))
    replace = grad_callback(operation.callback, operation.ref.module, operation.direction, has_value=value is not None)
    function = builder.var("grad_fn", replace)
    builder.add(ast.Set(dsl_site(table, sites[0]), ast.Call(function, tuple(arguments)), grad=True))
