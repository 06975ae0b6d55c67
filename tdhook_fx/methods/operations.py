"""The record of a session's operations, with tdhook's names (`HookSpec`, `HookProgram`, ...).

tdhook describes what a `HookSession` (or a method) installed as a model-free program of hook
specs; `session.program` is such a record here too, so code that inspects it keeps working. No
hook stands behind a spec: the operations are compiled into one DSL program per call (the
session's `compiled.program`). The records check themselves as tdhook's do.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType
from tdhook_fx.targets import Target

DIRECTIONS = frozenset({"fwd", "bwd", "fwd_pre", "bwd_pre", "fwd_kwargs", "fwd_pre_kwargs"})


@dataclass(frozen=True)
class CaptureSource:
    """An operation's reference to an earlier capture (a live replacement's source)."""

    hook_index: int
    detach: bool

    def __post_init__(self) -> None:
        if type(self.hook_index) is not int:
            raise InvalidArgumentType("hook_index must be an integer")
        if self.hook_index < 0:
            raise InvalidArgument("hook_index must be non-negative")
        if not isinstance(self.detach, bool):
            raise InvalidArgumentType("detach must be a bool")


@dataclass(frozen=True)
class HookSpec:
    """One operation: where (`module_path`), what (`operation`), which value (`direction`, `target`)."""

    module_path: str
    operation: str
    direction: str | None
    prepend: bool = False
    target: Target | None = None
    source: CaptureSource | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module_path, str):
            raise InvalidArgumentType("module_path must be a string")
        if not isinstance(self.operation, str):
            raise InvalidArgumentType("operation must be a string")
        if not self.operation:
            raise InvalidArgument("operation must be non-empty")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise InvalidArgument(f"invalid hook direction: {self.direction!r}")
        if not isinstance(self.prepend, bool):
            raise InvalidArgumentType("prepend must be a bool")
        if self.target is not None and not isinstance(self.target, Target):
            raise InvalidArgumentType("target must be a Target")
        if self.source is not None and not isinstance(self.source, CaptureSource):
            raise InvalidArgumentType("source must be a CaptureSource")


@dataclass(frozen=True)
class TargetOccurrencePlan:
    """The calls an operation selects (`Target.occurrences`), counted per root-model pass."""

    hook_index: int
    target_path: str
    operation: str
    direction: str
    selected_indices: tuple[int, ...]
    reset_scope: str = "root_model_pass"


@dataclass(frozen=True)
class TargetOccurrenceEvidence:
    """The calls of a target's module seen in one root-model pass, and the ones selected."""

    hook_index: int
    target_path: str
    operation: str
    direction: str
    root_pass: int
    selected_indices: tuple[int, ...]
    observed_indices: tuple[int, ...]
    reset_scope: str = "root_model_pass"


@dataclass(frozen=True)
class HookProgram:
    """The operations in the order they were declared, and where a stop was reached."""

    hooks: tuple[HookSpec, ...] = ()
    stopped_at: str | None = None

    def __post_init__(self) -> None:
        for index, spec in enumerate(self.hooks):
            if spec.source is None:
                continue
            if spec.source.hook_index >= index:
                raise InvalidArgument("capture dependencies must refer to an earlier hook")
            if self.hooks[spec.source.hook_index].operation != "capture":
                raise InvalidArgument("capture dependencies must refer to a capture hook")

    @property
    def occurrence_plans(self) -> tuple[TargetOccurrencePlan, ...]:
        """The operations that select some calls of their module, in declaration order."""
        return tuple(
            TargetOccurrencePlan(i, spec.target.module_path, spec.operation, spec.direction, spec.target.occurrences)
            for i, spec in enumerate(self.hooks)
            if spec.target is not None and spec.target.occurrences is not None and spec.direction is not None
        )
