"""Task vectors (Ilharco et al. 2022): weight differences added back with a scale, as a graph edit.

    with TaskVectors(alphas=[0.1, 0.5, 1.0], get_test_accuracy=acc, get_control_adequacy=ok).prepare(model) as hooked:
        tau = hooked.get_task_vector(finetuned)          # finetuned - pretrained weights (a TensorDict)
        alpha = hooked.hooking_context.compute_alpha(tau)
        with hooked.with_applied_vectors(tau, alpha=alpha):
            td = hooked(td)                              # the model with weights + alpha * tau

tdhook loads the edited weights into the model for the duration; here the model's weights are
never written: while vectors are applied, each call of the hooked module runs the program
`steer PARAM += $task_alpha * $task_vector_N`, one statement per parameter the vector changes
(a weight edited where its module uses it, see `tdhook_fx.compiler.passes.parameters`). The
scale and the vectors are runtime values, so sweeping alpha (`compute_alpha`) compiles the
program once. Calls of the model itself, outside the hooked module, see the original weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.errors import MethodUsageError
from tdhook_fx.methods.context import HookingContext, OnePassMethod
from tdhook_fx.methods.hooked import HookedModule
from tdhook_fx.methods.paths import dsl_path
from tdhook_fx.syntax import ast


class TaskVectorsContext(HookingContext):
    """The context of `TaskVectors`: chooses alpha (`compute_alpha`) among the candidates."""

    def __init__(
        self,
        *args,
        alphas: Iterable[float],
        get_test_accuracy: Callable,
        get_control_adequacy: Callable,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.alphas = alphas
        self.get_test_accuracy = get_test_accuracy
        self.get_control_adequacy = get_control_adequacy

    def compute_alpha(self, vector: TensorDictBase) -> float:
        """The alpha of best test accuracy among those whose control adequacy holds."""
        if not self.active:
            raise MethodUsageError("Cannot compute alpha outside of context")
        hooked = self.module
        adequate = []
        for alpha in self.alphas:
            with hooked.with_applied_vectors(vector, alpha=alpha) as module:
                if self.get_control_adequacy(module):
                    adequate.append((alpha, self.get_test_accuracy(module)))
        if not adequate:
            raise MethodUsageError("No value satisfies the control adequacy criterion")
        return max(adequate, key=lambda pair: pair[1])[0]


class TaskVectorsModule(HookedModule):
    """The hooked module of `TaskVectors`: vectors from finetuned models, and weights with them applied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._weights = TensorDict.from_module(self.interface.model)
        self.__dict__["_applied"] = None  # (alpha, {parameter name: vector}) while vectors are applied

    @property
    def applied(self) -> tuple[float, dict] | None:
        """The alpha and the vector of each parameter, while `with_applied_vectors` is active."""
        return self.__dict__["_applied"]

    @property
    def applied_program(self) -> str | None:
        """The program the last call ran with vectors applied (None before any)."""
        return self.__dict__.get("_applied_program")

    @torch.no_grad()
    def get_task_vector(self, finetuned_module) -> TensorDictBase:
        """finetuned weights - these weights (same keys as `TensorDict.from_module`)."""
        return TensorDict.from_module(finetuned_module) - self._weights

    @torch.no_grad()
    def get_forget_vector(self, finetuned_module) -> TensorDictBase:
        """The negated task vector."""
        return -self.get_task_vector(finetuned_module)

    @torch.no_grad()
    def get_weights(self, *vectors: TensorDictBase, alpha: float | None = None) -> TensorDictBase:
        """These weights + alpha * the sum of `vectors` (alpha from `compute_alpha` when not given)."""
        if alpha is None:
            context = self.hooking_context
            if not isinstance(context, TaskVectorsContext):
                raise MethodUsageError("Module is not bound with TaskVectors")
            alpha = context.compute_alpha(sum(vectors))
        return self._weights + sum(vectors) * alpha

    @contextmanager
    def with_applied_vectors(self, *vectors: TensorDictBase, alpha: float | None = None):
        """Inside the block, calls of this module run the model with weights + alpha * sum(vectors)."""
        if alpha is None:
            context = self.hooking_context
            if not isinstance(context, TaskVectorsContext):
                raise MethodUsageError("Module is not bound with TaskVectors")
            alpha = context.compute_alpha(sum(vectors))
        self.__dict__["_applied"] = (alpha, _parameter_vectors(self, sum(vectors)))
        try:
            yield self
        finally:
            self.__dict__["_applied"] = None

    def execute(self, builder, inputs, *, sources=None):
        result = super().execute(builder, inputs, sources=sources)
        if self.applied is not None:
            self.__dict__["_applied_program"] = result.compiled.program
        return result


def _parameter_vectors(module: TaskVectorsModule, vector: TensorDictBase) -> dict[str, torch.Tensor]:
    """The vector's entries by parameter name; buffers must not change (only weights can be edited)."""
    model = module.interface.model
    parameters = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    entries = {}
    for key, value in vector.items(include_nested=True, leaves_only=True):
        name = ".".join(key) if isinstance(key, tuple) else key
        if name in parameters:
            entries[name] = value
        elif name in buffers and bool(torch.any(value != 0)):
            raise MethodUsageError(
                f"the vector changes the buffer {name!r}; tdhook_fx applies task vectors to parameters only\n"
                "  hint: drop buffer entries from the vector (vector.exclude(...)) or keep them equal"
            )
    return entries


class TaskVectors(OnePassMethod):
    """tdhook's `TaskVectors(alphas, get_test_accuracy, get_control_adequacy)`; see the module doc."""

    _hooking_context_class = TaskVectorsContext
    _hooked_module_class = TaskVectorsModule

    def __init__(self, alphas: Iterable[float], get_test_accuracy: Callable, get_control_adequacy: Callable):
        super().__init__()
        self._hooking_context_kwargs.update(
            alphas=alphas, get_test_accuracy=get_test_accuracy, get_control_adequacy=get_control_adequacy
        )

    def build(self, hooked: TaskVectorsModule, builder, table, td) -> None:
        """`steer PARAM += $task_alpha * $task_vector_N` per parameter, while vectors are applied."""
        if hooked.applied is None:
            return
        alpha, vectors = hooked.applied
        scale = builder.var("task_alpha", torch.as_tensor(alpha))
        for name, vector in vectors.items():
            if name.rpartition(".")[0] and not table.calls(name.rpartition(".")[0]):
                continue  # a module the model does not call: its weights do nothing
            value = ast.BinOp("*", scale, builder.var("task_vector", vector))
            builder.add(ast.Steer(ast.Site(dsl_path(name)), "+=", value))
