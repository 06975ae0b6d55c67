"""`HookSession`: capture, replace and stop inside a `with` block, compiled into one program per call.

    with HookSession(model) as session:
        captured = session.capture(Target("linear1", "activation", -1, (2,)))
        session.replace(Target("linear1", "activation", -1, (2,)), 100)
        output = model(x)                      # runs the compiled program
    captured.values[-1]                        # the unit before the replacement

As in tdhook, the model itself is called inside the block. While the session is active, the
model's `forward` is routed (an instance attribute, removed on every exit path, never a hook)
to the session's operations compiled as one DSL program for that call's structure (see
`tdhook_fx.methods.session_program`; `session.compiled.program` shows it); calls with the same
structure and shapes compile nothing. Outside the block the model is exactly as it was:
a parameter replacement edits the weight where the compiled graph uses it, never the weight.

Captured activations are recorded when the call returns, captured gradients when the caller's
backward reaches them; `stop(path)` ends the block at the module's first output
(`EarlyStopResult`), as tdhook's early stop does.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MethodUsageError, ReplacementShapeError
from tdhook_fx.methods.operations import (
    CaptureSource,
    HookProgram,
    HookSpec,
    TargetOccurrenceEvidence,
    TargetOccurrencePlan,
)
from tdhook_fx.methods.paths import refer
from tdhook_fx.methods.programs import execute, sites_for
from tdhook_fx.methods.session_program import CallBuilder, Operation, stopped_output
from tdhook_fx.methods.session_root import root_call
from tdhook_fx.targets import Target

ALLOWED_DIRECTIONS = {
    "activation": ("fwd", "fwd_pre", "fwd_pre_kwargs"),
    "gradient": ("bwd", "bwd_pre"),
    "parameter": (None,),
}


@dataclass
class CapturedTarget:
    """The values a capture observed, in call order (one per selected module call and model call)."""

    values: list[Tensor] = field(default_factory=list)
    _target: Target | None = field(default=None, repr=False, compare=False)
    _session_token: object | None = field(default=None, repr=False, compare=False)
    _hook_index: int | None = field(default=None, repr=False, compare=False)
    _detach: bool = field(default=True, repr=False, compare=False)
    _execution: int | None = field(default=None, repr=False, compare=False)

    def _record(self, value: Tensor, execution: int | None = None) -> None:
        self.values.append(value)
        self._execution = execution


@dataclass
class EarlyStopResult:
    """Filled if a call reaches the session's stop: the exact output of the module it stopped at."""

    reached: bool = False
    output: object | None = None


class _StopSignal(BaseException):
    """Ends the session's block at a stop (a BaseException: model code's `except Exception` cannot catch it)."""


class HookSession:
    """An ordered set of captures, replacements and stops on `model` (held weakly); see the module doc."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentType("HookSession requires a torch.nn.Module")
        self._model_ref = weakref.ref(model)
        self._operations: list[Operation] | None = None
        self._specs: list[HookSpec] = []
        self._stopped_at: str | None = None
        self._session_token: object | None = None
        self._executions = 0
        self._evidence: list[TargetOccurrenceEvidence] = []
        self._stash: dict = {}
        self._compiled = None
        self._routed: tuple | None = None  # (model, the forward instance attribute it had, if any)

    # ---- the block -------------------------------------------------------------------------------

    def __enter__(self) -> HookSession:
        if self._operations is not None:
            raise MethodUsageError("Cannot enter a HookSession twice")
        model = self._model()
        self._operations, self._specs, self._stopped_at = [], [], None
        self._session_token = object()
        self._executions, self._evidence, self._stash = 0, [], {}
        self._route(model)
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if self._operations is None:
            raise MethodUsageError("Cannot exit a HookSession that is not active")
        try:
            self._unroute()
        finally:
            self._operations = None
            self._session_token = None
        return isinstance(exc, _StopSignal) and exc.args[0] is self

    @property
    def program(self) -> HookProgram:
        """The operations declared (tdhook's record), and where a stop was reached."""
        return HookProgram(tuple(self._specs), self._stopped_at)

    @property
    def compiled(self):
        """The `CompiledModule` that the last call of the model ran (`.program`, `.code`)."""
        if self._compiled is None:
            raise MethodUsageError("the model has not been called in this session yet")
        return self._compiled

    @property
    def occurrence_evidence(self) -> tuple[TargetOccurrenceEvidence, ...]:
        """For each operation selecting some calls (`Target.occurrences`): the calls each model call made."""
        return tuple(self._evidence)

    # ---- operations ------------------------------------------------------------------------------

    def capture(self, target: Target, *, direction: str | None = None, prepend: bool = False, detach: bool = True) -> CapturedTarget:
        """Record `target`'s value at each call (a parameter's: now). `direction` as tdhook's:
        fwd (default for activations), fwd_pre, fwd_pre_kwargs; bwd, bwd_pre (default for gradients).
        `detach=False` keeps the autograd history of captured activations."""
        model = self._active()
        module = _validated(target, model)
        self._check_no_stop(target)
        if not isinstance(detach, bool):
            raise InvalidArgumentType("detach must be a bool")
        direction = _direction(target, direction)
        index = len(self._specs)
        captured = CapturedTarget(_target=target, _session_token=self._session_token, _hook_index=index, _detach=detach)
        if target.kind == "parameter":
            value = target._select(target.parameter_of(module))
            captured._record(value.detach().clone() if detach else value)
        else:
            self._operations.append(Operation(index, "capture", target, direction, prepend, captured, detach))
        self._specs.append(HookSpec(target.module_path, "capture", direction, prepend, target))
        return captured

    def replace(
        self,
        target: Target,
        value: Tensor | float | CapturedTarget,
        *,
        direction: str | None = None,
        prepend: bool = False,
        transform: Callable | None = None,
    ) -> None:
        """Replace `target`'s units by `value` (broadcast) at each call, until the block ends; `value`
        may be a `CapturedTarget` of this session (its latest value in the same call, `transform`ed)."""
        model = self._active()
        module = _validated(target, model)
        self._check_no_stop(target)
        direction = _direction(target, direction)
        source = self._live_source(target, value, transform)
        if target.kind == "parameter":
            _check_fits(target, target.parameter_of(module), value)
        index = len(self._specs)
        operation = Operation(index, "replace", target, direction, prepend, transform=transform)
        if source is None:
            operation.value = value
        else:
            operation.source = next(op for op in self._operations if op.index == source._hook_index)
        self._operations.append(operation)
        origin = None if source is None else CaptureSource(source._hook_index, source._detach)
        self._specs.append(HookSpec(target.module_path, "replace", direction, prepend, target, origin))

    def stop(self, module_path: str, *, prepend: bool = False) -> EarlyStopResult:
        """End the block when `module_path` first produces its output (kept in the result, with its
        autograd history); what follows in the model does not run."""
        model = self._active()
        if not isinstance(module_path, str):
            raise InvalidArgumentType("module_path must be a string")
        if any(op.target is not None and op.target.kind == "gradient" for op in self._operations):
            raise InvalidArgument("HookSession early stopping cannot be combined with gradient operations")
        try:
            module = refer(model, model, module_path).module
        except ValueError as error:
            raise InvalidArgument(f"Invalid submodule path '{module_path}': {error}") from None
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            warnings.warn(
                f"stop at '{module_path}', a {type(module).__name__}: a container is never called, so the stop "
                "is never reached; stop at one of its modules",
                UserWarning,
                stacklevel=2,
            )
        result = EarlyStopResult()
        index = len(self._specs)
        self._operations.append(Operation(index, "stop", None, "fwd", prepend, module_path=module_path, stopped=result))
        self._specs.append(HookSpec(module_path, "stop", "fwd", prepend))
        return result

    # ---- checks ------------------------------------------------------------------------------------

    def _active(self) -> nn.Module:
        if self._operations is None:
            raise MethodUsageError("HookSession operations require an active context")
        return self._model()

    def _model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise MethodUsageError("The model bound to this HookSession no longer exists")
        return model

    def _check_no_stop(self, target: Target) -> None:
        if target.kind == "gradient" and any(op.kind == "stop" for op in self._operations):
            raise InvalidArgument("HookSession early stopping cannot be combined with gradient operations")

    def _live_source(self, target: Target, value, transform) -> CapturedTarget | None:
        if not isinstance(value, CapturedTarget):
            if transform is not None:
                raise InvalidArgument("transform is only valid for a live CapturedTarget replacement")
            return None
        if value._session_token is None or value._session_token is not self._session_token:
            raise InvalidArgument("live replacements require a capture from the same active HookSession")
        if value._target is None or value._hook_index is None:
            raise InvalidArgument("live replacements require a capture created by HookSession.capture")
        if target.kind == "parameter" or value._target.kind not in ("activation", "gradient"):
            raise InvalidArgument("live replacements support only activation or gradient targets")
        if value._target.kind != target.kind:
            raise InvalidArgument("live capture and replacement targets must have the same kind")
        if transform is not None and not callable(transform):
            raise InvalidArgumentType("transform must be callable")
        return value

    # ---- calls of the model -----------------------------------------------------------------------

    def _route(self, model: nn.Module) -> None:
        self._routed = (model, model.__dict__.get("forward"))
        session = self

        def forward(*args, **kwargs):
            return session._call(*args, **kwargs)

        model.__dict__["forward"] = forward

    def _unroute(self) -> None:
        if self._routed is None:
            return
        model, previous = self._routed
        self._routed = None
        if previous is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = previous

    def _call(self, *args, **kwargs):
        """One call of the model inside the block: its program compiled (or reused) and run."""
        model = self._model()
        routed = self._routed
        self._unroute()  # capturing and running the graph call the model's own forward
        try:
            return self._run(model, args, kwargs)
        finally:
            if routed is not None and self._operations is not None:
                self._route(model)

    def _run(self, model: nn.Module, args: tuple, kwargs: dict):
        call, leaves = root_call(model, args, kwargs)
        table = sites_for(call.interface, tuple(leaves))
        execution = self._executions
        program = CallBuilder(self._operations, call, table, model, execution, self._stash).build()
        result = execute(call.interface, program.builder, tuple(leaves), source="HookSession program")
        self._compiled = result.compiled
        self._executions += 1
        for operation, names in program.captures:
            for name in names:
                value = result.saved[name]
                operation.captured._record(value.detach().clone() if operation.detach else value, execution)
        for operation, calls in program.evidence:
            occurrences = operation.target.occurrences
            self._evidence.append(
                TargetOccurrenceEvidence(
                    operation.index, operation.target.module_path, operation.kind, operation.direction,
                    execution, occurrences, tuple(range(calls)),
                )
            )
        if program.stop is not None:
            operation = program.stop[0]
            operation.stopped.reached = True
            operation.stopped.output = stopped_output(program, result)
            self._stopped_at = operation.module_path
            raise _StopSignal(self)
        return call.result.rebuild([result.outputs[key] for key in call.interface.out_keys])

    # ---- tdhook's helpers on structured values ----------------------------------------------------

    @staticmethod
    def _resolved_output_path(value: object, path: tuple) -> tuple:
        return Target._resolved_output_path(value, path)

    @staticmethod
    def _hook_tensor(value: object, path: tuple = ()) -> Tensor:
        return Target._output_tensor(value, path)

    @staticmethod
    def _replace_hook_tensor(value: object, path: tuple, replacement: Tensor) -> object:
        return Target._replace_output_tensor(value, path, replacement)


def _validated(target: Target, model: nn.Module) -> nn.Module:
    if not isinstance(target, Target):
        raise InvalidArgumentType(f"a Target is needed, not a {type(target).__name__}")
    return target.validate(model)


def _direction(target: Target, direction: str | None) -> str | None:
    allowed = ALLOWED_DIRECTIONS[target.kind]
    if direction is None:
        return allowed[-1] if target.kind == "gradient" else allowed[0]
    if direction not in allowed:
        raise InvalidArgument(f"direction {direction!r} is not valid for a {target.kind} target")
    return direction


def _check_fits(target: Target, parameter: Tensor, value) -> None:
    """A parameter replacement is checked when declared: the value must broadcast to the selection."""
    if not isinstance(value, (Tensor, int, float)):
        raise InvalidArgumentType(f"a parameter is replaced by a number or a tensor, not a {type(value).__name__}")
    region = tuple(target._select(parameter.detach()).shape)
    shape = tuple(torch.as_tensor(value).shape)
    try:
        fits = tuple(torch.broadcast_shapes(shape, region)) == region
    except RuntimeError:
        fits = False
    if not fits:
        raise ReplacementShapeError(
            f"a value of shape {shape} cannot replace {target.module_path or 'the model'}.{target.parameter}'s "
            f"selected units, of shape {region}"
        )


__all__ = [
    "CaptureSource",
    "CapturedTarget",
    "EarlyStopResult",
    "HookProgram",
    "HookSession",
    "HookSpec",
    "TargetOccurrenceEvidence",
    "TargetOccurrencePlan",
]
