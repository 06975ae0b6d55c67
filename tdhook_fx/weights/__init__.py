"""Weight-level methods (tdhook.weights), each compiled into a rewrite of the model's graph."""

from tdhook_fx.weights.adapters import Adapters, HookedModuleWithAdapters
from tdhook_fx.weights.pruning import Pruning
from tdhook_fx.weights.task_vectors import TaskVectors

__all__ = ["Adapters", "HookedModuleWithAdapters", "Pruning", "TaskVectors"]
