"""Optimized interventions (tdhook's `interventions`): learn an activation value by gradient descent.

    spec = InterventionSpec(Target("blocks.1", "activation", -1, (3,)), objective, "raise unit 3",
                            max_steps=50, optimizer=OptimizerConfig("adam", 1e-2))
    result = optimize_intervention(model, (x,), spec)
    result.interventions[0].value, result.output, result.to_dict()

Each stage captures its target (unless `initial_value` is given), then minimizes
`objective(output, value)` (plus `preservation_regularizer(value, initial)`) over the value that
replaces the target, with every parameter of `model` and `frozen_modules` frozen and restored
afterwards. The replacement is a `HookSession.replace`, so every step runs the same compiled
program with the value as a runtime input: the value is differentiable through the compiled
graph, and no step recompiles. Earlier stages' values stay applied; a final pass with all of
them gives `result.output`. Outcomes, budgets and the history are tdhook's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Literal

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType, MethodUsageError
from tdhook_fx.session import HookSession
from tdhook_fx.targets import Target

InterventionStatus = Literal["converged", "stalled", "budget_exhausted", "non_finite"]
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    return bool(torch.isfinite(torch.tensor(float(value))))


@dataclass(frozen=True)
class OptimizerConfig:
    """Which torch optimizer ("adam", "adamw", "sgd"), its learning rate and other JSON-able arguments."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1e-2
    kwargs: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(f"unsupported optimizer: {self.name!r} (one of {', '.join(OPTIMIZERS)})")
        if not _is_number(self.learning_rate):
            raise InvalidArgumentType("learning_rate must be a number")
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise InvalidArgument("learning_rate must be positive and finite")
        if not isinstance(self.kwargs, Mapping):
            raise InvalidArgumentType("optimizer kwargs must be a mapping")
        try:
            json.dumps(dict(self.kwargs), sort_keys=True)
        except (TypeError, ValueError):
            raise InvalidArgumentType("optimizer kwargs must be JSON-serializable") from None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "learning_rate": float(self.learning_rate), "kwargs": dict(self.kwargs)}

    def build(self, value: Tensor) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.name]([value], lr=float(self.learning_rate), **dict(self.kwargs))


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Converged once the loss is at most `objective_threshold`; stalled after `patience` steps that
    improve the best loss by no more than `min_delta`. Neither: the whole step budget runs."""

    objective_threshold: float | None = None
    min_delta: float = 0.0
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.objective_threshold is not None:
            if not _is_number(self.objective_threshold):
                raise InvalidArgumentType("objective_threshold must be a number")
            if not _finite(self.objective_threshold):
                raise InvalidArgument("objective_threshold must be finite")
        if not _is_number(self.min_delta):
            raise InvalidArgumentType("min_delta must be a number")
        if not _finite(self.min_delta) or self.min_delta < 0:
            raise InvalidArgument("min_delta must be non-negative and finite")
        if self.patience is not None:
            if isinstance(self.patience, bool) or not isinstance(self.patience, int):
                raise InvalidArgumentType("patience must be an integer")
            if self.patience <= 0:
                raise InvalidArgument("patience must be positive")

    def to_dict(self) -> dict[str, object]:
        return {"objective_threshold": self.objective_threshold, "min_delta": float(self.min_delta), "patience": self.patience}


@dataclass(frozen=True)
class InterventionObjective:
    """A scalar loss and named scalar terms reported with it."""

    loss: Tensor
    terms: Mapping[str, Tensor | float | int] = field(default_factory=dict)


@dataclass(frozen=True)
class InterventionSpec:
    """One stage: the activation `target` to optimize, its objective and optimization settings."""

    target: Target
    objective: Callable = field(repr=False, compare=False)
    objective_name: str
    max_steps: int = 100
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    initial_value: Tensor | None = field(default=None, repr=False, compare=False)
    preservation_regularizer: Callable | None = field(default=None, repr=False, compare=False)
    direction: str | None = None

    def __post_init__(self) -> None:
        if self.target.kind != "activation":
            raise InvalidArgument("optimized interventions require activation targets")
        if not callable(self.objective):
            raise InvalidArgumentType("objective must be callable")
        if not isinstance(self.objective_name, str):
            raise InvalidArgumentType("objective_name must be a string")
        if not self.objective_name:
            raise InvalidArgument("objective_name must be non-empty")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise InvalidArgumentType("max_steps must be an integer")
        if self.max_steps <= 0:
            raise InvalidArgument("max_steps must be positive")
        if self.initial_value is not None and not isinstance(self.initial_value, Tensor):
            raise InvalidArgumentType("initial_value must be a tensor")
        if self.preservation_regularizer is not None and not callable(self.preservation_regularizer):
            raise InvalidArgumentType("preservation_regularizer must be callable")
        if self.direction not in (None, "fwd", "fwd_pre", "fwd_pre_kwargs"):
            raise InvalidArgument("optimized interventions require a forward hook direction (fwd, fwd_pre, fwd_pre_kwargs)")

    @property
    def pass_budget(self) -> int:
        """Model passes this stage may take: a capture (without `initial_value`) and one per step."""
        return (self.initial_value is None) + self.max_steps


@dataclass(frozen=True)
class InterventionStepArtifact:
    step: int
    terms: Mapping[str, float]

    def to_dict(self) -> dict[str, object]:
        return {"step": self.step, "terms": dict(self.terms)}


@dataclass(frozen=True)
class InterventionStageArtifact:
    """What one stage did: settings, outcome, history, and a fingerprint of the value found."""

    target: Target
    objective_name: str
    optimizer: OptimizerConfig
    early_stopping: EarlyStoppingConfig
    step_budget: int
    steps_completed: int
    model_pass_budget: int
    model_passes: int
    status: InterventionStatus
    history: tuple[InterventionStepArtifact, ...]
    value_shape: tuple[int, ...]
    value_dtype: str
    value_sha256: str

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target.to_dict(),
            "objective_name": self.objective_name,
            "optimizer": self.optimizer.to_dict(),
            "early_stopping": self.early_stopping.to_dict(),
            "step_budget": self.step_budget,
            "steps_completed": self.steps_completed,
            "model_pass_budget": self.model_pass_budget,
            "model_passes": self.model_passes,
            "status": self.status,
            "history": [item.to_dict() for item in self.history],
            "value_shape": list(self.value_shape),
            "value_dtype": self.value_dtype,
            "value_sha256": self.value_sha256,
        }


@dataclass(frozen=True)
class OptimizedIntervention:
    """A value found, and where it replaces the target."""

    target: Target
    value: Tensor = field(repr=False, compare=False)
    direction: str | None = None


@dataclass(frozen=True)
class OptimizedInterventionResult:
    """The model's output with every value applied, the values, and each stage's record."""

    output: object = field(repr=False, compare=False)
    interventions: tuple[OptimizedIntervention, ...]
    stages: tuple[InterventionStageArtifact, ...]
    model_pass_budget: int
    model_passes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "stages": [stage.to_dict() for stage in self.stages],
            "model_pass_budget": self.model_pass_budget,
            "model_passes": self.model_passes,
        }


def optimize_interventions(
    model: nn.Module,
    model_args: Sequence[object],
    specs: Sequence[InterventionSpec],
    *,
    model_kwargs: Mapping[str, object] | None = None,
    frozen_modules: Sequence[nn.Module] = (),
    seed: int | None = None,
) -> OptimizedInterventionResult:
    """Optimize the stages in order (each with the earlier values applied); see the module doc."""
    _check_arguments(model, model_args, specs, model_kwargs, frozen_modules, seed)
    kwargs = dict(model_kwargs or {})
    found: list[OptimizedIntervention] = []
    stages: list[InterventionStageArtifact] = []
    passes = 0
    inputs = _tensors((model_args, kwargs))
    state = [*inputs, *(t for m in (model, *frozen_modules) for t in (*m.parameters(), *m.buffers()))]
    with _modules_kept((model, *frozen_modules)), _input_grads_kept(inputs), _rng_kept(seed, state):
        for spec in specs:
            stage = _Stage(model, model_args, kwargs, spec, found)
            value = stage.run()
            passes += stage.passes
            found.append(OptimizedIntervention(spec.target, value, spec.direction))
            stages.append(stage.artifact(value))
        with torch.no_grad(), HookSession(model) as session:
            _apply(session, found)
            output = _copied(model(*model_args, **kwargs))
        passes += 1
    budget = 1 + sum(spec.pass_budget for spec in specs)
    return OptimizedInterventionResult(output, tuple(found), tuple(stages), budget, passes)


def optimize_intervention(model: nn.Module, model_args: Sequence[object], spec: InterventionSpec, **kwargs) -> OptimizedInterventionResult:
    """Optimize and apply one intervention (`optimize_interventions` with one stage)."""
    return optimize_interventions(model, model_args, (spec,), **kwargs)


class _Stage:
    """One stage's optimization loop."""

    def __init__(self, model, args, kwargs, spec: InterventionSpec, earlier: list[OptimizedIntervention]):
        self.model, self.args, self.kwargs, self.spec, self.earlier = model, args, kwargs, spec, earlier
        self.passes = 0
        self.history: list[InterventionStepArtifact] = []
        self.status: InterventionStatus = "budget_exhausted"

    def _initial(self) -> Tensor:
        if self.spec.initial_value is not None:
            return self.spec.initial_value.detach().clone()
        with HookSession(self.model) as session:
            _apply(session, self.earlier)
            captured = session.capture(self.spec.target, direction=self.spec.direction)
            self.model(*self.args, **self.kwargs)
        self.passes += 1
        if not captured.values:
            raise MethodUsageError(f"target {self.spec.target.module_path!r} was not reached")
        return captured.values[-1]

    def run(self) -> Tensor:
        spec = self.spec
        initial = self._initial()
        value = initial.detach().clone().requires_grad_(True)
        optimizer = spec.optimizer.build(value)
        best, stalled = float("inf"), 0
        for step in range(spec.max_steps):
            optimizer.zero_grad()
            with HookSession(self.model) as session:
                _apply(session, self.earlier)
                session.replace(spec.target, value, direction=spec.direction)
                output = self.model(*self.args, **self.kwargs)
            self.passes += 1
            loss, terms = self._objective(output, value, initial)
            numbers = _numbers({"loss": loss, **terms})
            self.history.append(InterventionStepArtifact(step, numbers))
            current = numbers["loss"]
            if not all(_finite(v) for v in numbers.values()):
                self.status = "non_finite"
                break
            stopping = spec.early_stopping
            if stopping.objective_threshold is not None and current <= stopping.objective_threshold:
                self.status = "converged"
                break
            if best - current > stopping.min_delta:
                best, stalled = current, 0
            else:
                stalled += 1
                if stopping.patience is not None and stalled >= stopping.patience:
                    self.status = "stalled"
                    break
            loss.backward()
            if value.grad is None or not torch.isfinite(value.grad).all():
                self.status = "non_finite"
                break
            last_finite = value.detach().clone()
            optimizer.step()
            if not torch.isfinite(value).all():
                with torch.no_grad():
                    value.copy_(last_finite)
                self.status = "non_finite"
                break
        return value.detach().clone()

    def _objective(self, output, value: Tensor, initial: Tensor) -> tuple[Tensor, dict]:
        objective = _as_objective(self.spec.objective(output, value))
        loss, terms = objective.loss, dict(objective.terms)
        regularizer = self.spec.preservation_regularizer
        if regularizer is not None:
            if "preservation" in terms:
                raise InvalidArgument("objective terms reserve the name 'preservation'")
            preservation = regularizer(value, initial)
            _check_scalar(preservation, "preservation regularizer")
            loss = loss + preservation
            terms["preservation"] = preservation
        return loss, terms

    def artifact(self, value: Tensor) -> InterventionStageArtifact:
        spec = self.spec
        return InterventionStageArtifact(
            spec.target, spec.objective_name, spec.optimizer, spec.early_stopping, spec.max_steps,
            len(self.history), spec.pass_budget, self.passes, self.status, tuple(self.history),
            tuple(value.shape), str(value.dtype), _fingerprint(value),
        )


def _apply(session: HookSession, interventions: list[OptimizedIntervention]) -> None:
    for intervention in interventions:
        session.replace(intervention.target, intervention.value, direction=intervention.direction)


def _check_arguments(model, model_args, specs, model_kwargs, frozen_modules, seed) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidArgumentType("model must be a torch.nn.Module")
    if isinstance(model_args, (str, bytes)) or not isinstance(model_args, Sequence):
        raise InvalidArgumentType("model_args must be a sequence")
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise InvalidArgumentType("specs must be a sequence")
    if not specs:
        raise InvalidArgument("specs must contain at least one intervention")
    if not all(isinstance(spec, InterventionSpec) for spec in specs):
        raise InvalidArgumentType("every spec must be an InterventionSpec")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise InvalidArgumentType("model_kwargs must be a mapping")
    if not all(isinstance(module, nn.Module) for module in frozen_modules):
        raise InvalidArgumentType("frozen_modules must contain torch.nn.Module instances")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgumentType("seed must be an integer")


def _as_objective(value) -> InterventionObjective:
    if isinstance(value, Tensor):
        value = InterventionObjective(value)
    elif not isinstance(value, InterventionObjective):
        raise InvalidArgumentType("objective must return a tensor or InterventionObjective")
    _check_scalar(value.loss, "objective loss")
    if not isinstance(value.terms, Mapping):
        raise InvalidArgumentType("objective terms must be a mapping")
    if "loss" in value.terms:
        raise InvalidArgument("objective terms reserve the name 'loss'")
    return value


def _check_scalar(value, name: str) -> None:
    if not isinstance(value, Tensor):
        raise InvalidArgumentType(f"{name} must be a tensor")
    if value.numel() != 1:
        raise InvalidArgument(f"{name} must be scalar")


def _numbers(terms: Mapping) -> dict[str, float]:
    numbers = {}
    for name, value in terms.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument("objective term names must be non-empty strings")
        if isinstance(value, Tensor):
            _check_scalar(value, f"objective term {name!r}")
            numbers[name] = float(value.detach().cpu())
        elif _is_number(value):
            numbers[name] = float(value)
        else:
            raise InvalidArgumentType(f"objective term {name!r} must be numeric")
    return numbers


def _fingerprint(value: Tensor) -> str:
    return sha256(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _tensors(values) -> tuple[Tensor, ...]:
    """Every tensor inside nested sequences and mappings (each once)."""
    found, pending, seen = [], [values], set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            pending.extend(value)
    return tuple(found)


def _copied(value):
    """The final output, copied so that it shares nothing with state restored afterwards."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, TensorDictBase):
        return value.clone()
    if isinstance(value, MutableMapping):
        result = copy(value)
        for key, item in value.items():
            result[key] = _copied(item)
        return result
    if isinstance(value, tuple):
        items = tuple(_copied(item) for item in value)
        return type(value)(*items) if hasattr(value, "_fields") else items
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


@contextmanager
def _input_grads_kept(tensors: Sequence[Tensor]):
    kept = [(t, None if t.grad is None else t.grad.detach().clone()) for t in tensors if t.is_leaf]
    try:
        yield
    finally:
        for tensor, grad in kept:
            tensor.grad = grad


@contextmanager
def _rng_kept(seed: int | None, tensors: Sequence[Tensor]):
    """The caller's random state (CPU, and the CUDA devices the tensors use) is left as it was;
    `seed` seeds the optimization's (those generators only)."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for device in devices:
                torch.cuda.default_generators[device].manual_seed(seed)
        yield


@contextmanager
def _modules_kept(modules: Sequence[nn.Module]):
    """Parameters frozen during the optimization; values, gradients, flags, buffers and modes restored."""
    parameters, buffers, modes, seen = [], [], [], set()
    for module in modules:
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                grad = None if parameter.grad is None else parameter.grad.detach().clone()
                parameters.append((parameter, parameter.detach().clone(), parameter.requires_grad, grad))
                parameter.requires_grad_(False)
        for buffer in module.buffers():
            if id(buffer) not in seen:
                seen.add(id(buffer))
                buffers.append((buffer, buffer.detach().clone()))
        modes.extend((submodule, submodule.training) for submodule in module.modules())
    try:
        yield
    finally:
        with torch.no_grad():
            for submodule, training in modes:
                submodule.training = training
            for parameter, value, requires_grad, grad in parameters:
                parameter.copy_(value)
                parameter.requires_grad_(requires_grad)
                parameter.grad = grad
            for buffer, value in buffers:
                buffer.copy_(value)


__all__ = [
    "EarlyStoppingConfig",
    "InterventionObjective",
    "InterventionSpec",
    "InterventionStageArtifact",
    "InterventionStatus",
    "InterventionStepArtifact",
    "OptimizedIntervention",
    "OptimizedInterventionResult",
    "OptimizerConfig",
    "optimize_intervention",
    "optimize_interventions",
]
