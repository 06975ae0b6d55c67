"""What a method needs from a model run that its TensorDict keys cannot say (tdhook's `execution`).

`ExecutionSpec(model_passes, gradient_mode, autograd_lifetime)`: how many passes of the model a
call of the method costs in tdhook, whether they need autograd, and whether the method's state
must outlive the call until the caller's backward (`AutogradLifetime.BACKWARD`). `Workflow`
reads it. In tdhook_fx `model_passes` is tdhook's count; `Workflow.passes` says how many
compiled passes a workflow really runs (one-pass methods share one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tdhook_fx.errors import InvalidArgument, InvalidArgumentType


class GradientMode(StrEnum):
    """Whether a method's model runs need autograd."""

    DISABLED = "disabled"
    OPTIONAL = "optional"
    REQUIRED = "required"


class AutogradLifetime(StrEnum):
    """When a method is done with autograd: within its call, or after the caller's backward."""

    CALL = "call"
    BACKWARD = "backward"


@dataclass(frozen=True)
class ExecutionSpec:
    """A method's requirements on the model runs: passes, gradients, and how long it needs them."""

    model_passes: int = 1
    gradient_mode: GradientMode = GradientMode.OPTIONAL
    autograd_lifetime: AutogradLifetime = AutogradLifetime.CALL

    def __post_init__(self) -> None:
        if isinstance(self.model_passes, bool) or not isinstance(self.model_passes, int):
            raise InvalidArgumentType("model_passes must be an integer")
        if self.model_passes < 1:
            raise InvalidArgument("method execution requires at least one model pass")
        if not isinstance(self.gradient_mode, GradientMode):
            raise InvalidArgumentType("gradient_mode must be a GradientMode")
        if not isinstance(self.autograd_lifetime, AutogradLifetime):
            raise InvalidArgumentType("autograd_lifetime must be an AutogradLifetime")
        if self.autograd_lifetime is AutogradLifetime.BACKWARD and self.gradient_mode is not GradientMode.REQUIRED:
            raise InvalidArgument("deferred backward requires gradient_mode=REQUIRED")


__all__ = ["AutogradLifetime", "ExecutionSpec", "GradientMode"]
