"""`Workflow`: methods and TensorDict operators run in order on one TensorDict, with tdhook's contract.

    workflow = Workflow(
        ActivationCaching(r"transformer\\.h\\.\\d+$", cache_key=("acts", "blocks")),
        Probing(r"transformer\\.h\\.1$", manager.probe_factory, additional_keys=["labels", "step_type"]),
        TensorDictModule(summary, in_keys=[("acts", "blocks")], out_keys=["summary"]),
    )
    td = workflow(model, td)
    print(workflow.program)                  # the passes the last run compiled

As in tdhook 0.3.0: each step is a configured method (`prepare(model)` is called on each run)
or a `TensorDictModuleBase` operator; keys a step reads must exist (or come from an earlier
step) before anything runs; an output a method owns (not the model's outputs) may be written
by a later step only through `WorkflowUpdate(step)`; a method whose `ExecutionSpec` keeps its
state until the caller's backward (`AutogradLifetime.BACKWARD`) stays open until that backward
and must be the last model-executing step; shared or consolidated TensorDicts keep their storage
(`tdhook_fx.methods.handoff`).

Unlike tdhook, consecutive methods that only read the model (`ActivationCaching`, `Probing`,
the plain model) run as ONE compiled pass (`tdhook_fx.methods.fusion`): `workflow.passes`
lists each fused pass and its program.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MethodUsageError, WorkflowHandoffError
from tdhook_fx.execution import AutogradLifetime, ExecutionSpec, GradientMode
from tdhook_fx.methods.context import HookingContext
from tdhook_fx.methods.fusion import FusedPass, reads_only, run_fused
from tdhook_fx.methods.handoff import Handoff
from tdhook_fx.methods.hooked import HookedModule


@runtime_checkable
class WorkflowMethod(Protocol):
    """What a workflow needs of a method: its `execution_spec` and `prepare(model)`."""

    @property
    def execution_spec(self) -> ExecutionSpec: ...

    def prepare(self, module: nn.Module) -> HookingContext: ...


@dataclass(frozen=True)
class WorkflowUpdate:
    """Let `step` replace an output an earlier step of the workflow owns."""

    step: object


@dataclass(frozen=True)
class _Operator:
    name: str
    operator: TensorDictModuleBase
    in_keys: tuple
    out_keys: tuple
    update: bool


@dataclass(frozen=True)
class _Method:
    name: str
    method: object
    context: HookingContext
    module: HookedModule
    spec: ExecutionSpec
    in_keys: tuple
    out_keys: tuple
    model_out_keys: tuple
    update: bool

    @property
    def owned_keys(self) -> tuple:
        return tuple(key for key in self.out_keys if key not in self.model_out_keys)


def _is_method(step) -> bool:
    return isinstance(step, WorkflowMethod) and not isinstance(step, TensorDictModuleBase)


def _key_path(key) -> tuple:
    return (key,) if isinstance(key, str) else tuple(key)


def _overlap(left, right) -> bool:
    left, right = _key_path(left), _key_path(right)
    common = min(len(left), len(right))
    return left[:common] == right[:common]


def _covers(namespace, key) -> bool:
    """Whether an output `namespace` (a TensorDict) may hold `key` below it."""
    outer, inner = _key_path(namespace), _key_path(key)
    return len(outer) < len(inner) and inner[: len(outer)] == outer


class Workflow:
    """Run methods and TensorDict operators in order; see the module doc."""

    def __init__(self, *steps):
        self.steps = tuple(steps)
        for index, step in enumerate(self.steps):
            actual = step.step if isinstance(step, WorkflowUpdate) else step
            if not isinstance(actual, TensorDictModuleBase) and not _is_method(actual):
                raise InvalidArgumentType(
                    f"Workflow step {index} must be a configured method or TensorDictModuleBase, got {type(step).__name__}"
                )
        self._passes: tuple[FusedPass, ...] = ()

    @property
    def passes(self) -> tuple[FusedPass, ...]:
        """The fused passes the last run compiled (one per group of consecutive read-only methods)."""
        return self._passes

    @property
    def program(self) -> str:
        """The programs of the last run's fused passes, each headed by the steps it served."""
        blocks = [f"# pass {i + 1}: {', '.join(p.steps)}\n{p.program}" for i, p in enumerate(self._passes)]
        return "\n".join(blocks)

    def __call__(self, model: nn.Module, data: TensorDictBase) -> TensorDictBase:
        return self.run(model, data)

    def run(self, model: nn.Module, data: TensorDictBase) -> TensorDictBase:
        """Run every step once on `data` and return the resulting TensorDict."""
        if not isinstance(model, nn.Module):
            raise InvalidArgumentType(f"Workflow model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(data, TensorDictBase):
            raise InvalidArgumentType(f"Workflow data must be a TensorDict, got {type(data).__name__}")
        nodes = [self._node(index, step, model) for index, step in enumerate(self.steps)]
        _check_keys(nodes, data)
        _check_gradients(nodes)
        handoff = Handoff.of(data)
        if handoff is not None:
            for node in nodes:
                handoff.check_step(node.out_keys, node.spec if isinstance(node, _Method) else None)
        current = handoff.working_copy() if handoff is not None else data
        working = current
        passes = []
        position = 0
        while position < len(nodes):
            group = _fusible_group(nodes, position)
            if len(group) > 1:
                current, fused = self._run_fused(group, current)
                passes.append(fused)
            else:
                current = self._run_one(nodes[position], current)
            for node in group or [nodes[position]]:
                if handoff is not None:
                    handoff.commit(current, working, node.name, node.out_keys)
            position += max(1, len(group))
        self._passes = tuple(passes)
        return handoff.result() if handoff is not None else current

    # ---- steps -----------------------------------------------------------------------------------

    def _node(self, index: int, step, model: nn.Module):
        update = isinstance(step, WorkflowUpdate)
        actual = step.step if update else step
        name = f"{index}:{type(actual).__name__}"
        if isinstance(actual, TensorDictModuleBase):
            return _Operator(name, actual, tuple(actual.in_keys), tuple(actual.out_keys), update)
        spec = actual.execution_spec
        if not isinstance(spec, ExecutionSpec):
            raise InvalidArgumentType(
                f"{type(actual).__name__}.execution_spec must be an ExecutionSpec, got {type(spec).__name__}"
            )
        context = actual.prepare(model)
        if not isinstance(context, HookingContext):
            raise InvalidArgumentType(
                f"{type(actual).__name__}.prepare(model) must return a HookingContext, got {type(context).__name__}"
            )
        module = context.module
        if not isinstance(module, TensorDictModuleBase):
            raise InvalidArgumentType(
                f"{type(actual).__name__}.prepare(model) must prepare a TensorDictModuleBase, got {type(module).__name__}"
            )
        if not isinstance(module, HookedModule):
            raise InvalidArgumentType(
                f"{type(actual).__name__}.prepare(model) returned an invalid hooked module, got {type(module).__name__}"
            )
        method = module.method if module.method is not None else actual
        return _Method(
            name, method, context, module, spec, tuple(module.in_keys), tuple(module.out_keys),
            tuple(module.interface.out_keys), update,
        )

    def _run_one(self, node, current: TensorDictBase) -> TensorDictBase:
        _check_present(node, current)
        if isinstance(node, _Operator):
            result = node.operator(current)
            if not isinstance(result, TensorDictBase):
                raise InvalidArgumentType(
                    f"Workflow operator {node.name!r} must return a TensorDict, got {type(result).__name__}"
                )
            return result
        with ExitStack() as stack:
            entered = stack.enter_context(node.context)
            if not isinstance(entered, TensorDictModuleBase):
                raise InvalidArgumentType(
                    f"Workflow method {node.name!r} must enter a TensorDictModuleBase, got {type(entered).__name__}"
                )
            if entered is not node.module:
                raise InvalidArgumentType(
                    f"Workflow method {node.name!r} entered an invalid hooked module, got {type(entered).__name__}"
                )
            result = node.module(current)
            current = current if result is None else result
            if not isinstance(current, TensorDictBase):
                raise InvalidArgumentType(
                    f"Workflow method execution must return a TensorDict, got {type(current).__name__}"
                )
            if node.spec.autograd_lifetime is AutogradLifetime.BACKWARD:
                _DeferredAutogradCleanup(stack.pop_all()).arm(current, node.model_out_keys)
        return current

    def _run_fused(self, group: list[_Method], current: TensorDictBase) -> tuple[TensorDictBase, FusedPass]:
        for node in group:
            _check_present(node, current)
        with ExitStack() as stack:
            steps = [(node.name, node.method, stack.enter_context(node.context)) for node in group]
            return run_fused(steps, current)


def _fusible_group(nodes: list, start: int) -> list[_Method]:
    """The read-only methods from `start` on that can share one pass (fewer than two: no group)."""
    group = []
    for node in nodes[start:]:
        fusible = (
            isinstance(node, _Method)
            and reads_only(node.method)
            and node.spec.autograd_lifetime is AutogradLifetime.CALL
            and type(node.context).__enter__ is HookingContext.__enter__
            and (not group or _same_call(node.module.interface, group[0].module.interface))
        )
        if not fusible:
            break
        group.append(node)
    return group if len(group) > 1 else []


def _same_call(left, right) -> bool:
    """Whether two methods call the model the same way (so one pass serves both)."""
    return left.model is right.model and (left.in_keys, left.call_keys, left.out_keys) == (
        right.in_keys, right.call_keys, right.out_keys
    )


def _check_keys(nodes: list, data: TensorDictBase) -> None:
    """Before anything runs: every key a step reads exists or comes from an earlier step, and no
    step writes another's output unless wrapped in `WorkflowUpdate`."""
    available = set(data.keys(include_nested=True, leaves_only=False))
    namespaces, owned = set(), set()
    for node in nodes:
        missing = tuple(k for k in node.in_keys if k not in available and not any(_covers(n, k) for n in namespaces))
        if missing:
            raise InvalidArgument(f"Workflow step {node.name!r} requires missing TensorDict keys: {missing!r}")
        mine = node.out_keys if isinstance(node, _Operator) else node.owned_keys
        collisions = tuple((key, earlier) for key in mine for earlier in owned if _overlap(key, earlier))
        if collisions and not node.update:
            raise InvalidArgument(
                f"Workflow step {node.name!r} overlaps earlier workflow-owned outputs: {collisions!r}; "
                "wrap an intentional replacement in WorkflowUpdate"
            )
        available.update(node.out_keys)
        namespaces.update(node.out_keys)
        owned.update(mine)


def _check_gradients(nodes: list) -> None:
    for position, node in enumerate(nodes):
        if not isinstance(node, _Method):
            continue
        if getattr(node.method, "reads_gradients", False) and node.spec.gradient_mode is not GradientMode.REQUIRED:
            raise InvalidArgument(
                f"Workflow step {node.name!r} reads gradients after the caller's backward (tdhook: installs backward "
                "hooks) but does not own an autograd-enabled execution"
            )
        later = any(isinstance(other, _Method) for other in nodes[position + 1 :])
        if node.spec.autograd_lifetime is AutogradLifetime.BACKWARD and later:
            raise InvalidArgument("A deferred-backward workflow method cannot precede another model-executing method")


def _check_present(node, current: TensorDictBase) -> None:
    missing = tuple(key for key in node.in_keys if key not in current)
    if missing:
        raise InvalidArgument(f"Workflow step {node.name!r} requires missing TensorDict keys: {missing!r}")


class _DeferredAutogradCleanup:
    """Leave a method's context open until the caller's backward through its outputs has finished."""

    def __init__(self, stack: ExitStack):
        self._stack = stack
        self._handles: list = []
        self._queued = False
        self._closed = False

    def arm(self, data: TensorDictBase, keys: Sequence) -> None:
        tensors = [v for v in (data.get(k, None) for k in keys) if isinstance(v, torch.Tensor) and v.requires_grad]
        if not tensors:
            self.close()
            raise MethodUsageError("Deferred-backward workflow execution did not produce an autograd-enabled model output")
        self._handles = [tensor.register_hook(self._queue) for tensor in tensors]

    def _queue(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.close)
        return grad

    def close(self) -> None:
        """Remove the output hooks and close the context, once; the first failure is raised."""
        if self._closed:
            return
        self._closed = True
        failure = None
        for handle in self._handles:
            try:
                handle.remove()
            except BaseException as error:  # noqa: BLE001 - every handle is tried; the first failure is raised
                failure = failure or error
        self._handles = []
        try:
            self._stack.close()
        except BaseException as error:  # noqa: BLE001
            failure = failure or error
        if failure is not None:
            raise failure


__all__ = ["Workflow", "WorkflowHandoffError", "WorkflowMethod", "WorkflowUpdate"]
