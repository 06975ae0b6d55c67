"""Steering: apply a steering function (SteeringVectors) or extract a vector (ActivationAddition).

`SteeringVectors(["transformer.h.1.mlp"], steer_fn)` compiles to
`set transformer.h.1.mlp = $steer_fn_0(value)`, where `$steer_fn_0` calls
`steer_fn(module_key="transformer.h.1.mlp", output=value)` inside the rewritten graph (a
return value of None keeps the output). One statement per module call. A `Target` entry gives
`steer_fn` its selected units only (`set M[..., 2:3] = $steer_fn_0(value)`), as tdhook does.

`ActivationAddition(["transformer.h.1.mlp"])` compiles `save` statements (cut short by a
`stop` after the last one, since nothing later is needed), runs them on the positive and on
the negative inputs, and returns tdhook's TensorDict (batch size ()) holding
`(steer_key, path) = mean over the batch of (positive - negative)`.
"""

from __future__ import annotations

from collections.abc import Callable

from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.execution import ExecutionSpec
from tdhook_fx.methods.context import HookingContextFactory, OnePassMethod
from tdhook_fx.methods.interface import never_called
from tdhook_fx.methods.paths import refer
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reads import Read, add_read, add_replace, dsl_site
from tdhook_fx.methods.targets import selected_read, target_output
from tdhook_fx.syntax import ast
from tdhook_fx.targets import Target, activation_target


class SteeringVectors(OnePassMethod):
    """Replace each module's output by `steer_fn(module_key=path, output=output)`."""

    def __init__(self, modules_to_steer: list[str | Target], steer_fn: Callable):
        super().__init__()
        self._targets = [activation_target(entry, argument="modules_to_steer") for entry in modules_to_steer]
        self._modules_to_steer = [path for path, _ in self._targets]
        self._steer_fn = steer_fn

    def build(self, hooked, builder, table, td):
        interface = hooked.interface
        for path, target in self._targets:
            ref = refer(interface.root, interface.model, path)

            def steer(output, _key=path):
                return self._steer_fn(module_key=_key, output=output)

            for call in range(table.calls(ref.name)):
                if target is None:
                    add_replace(builder, table, path, ref.name, call, steer, prefix="steer_fn")
                    continue
                _, site = target_output(builder, table, ref.name, ref.module, target, call)  # the units only

                def steer_units(units, _steer=steer):
                    replaced = _steer(units)
                    return units if replaced is None else replaced

                builder.add(ast.Set(site, builder.call(steer_units, "steer_fn", ast.SiteValue())))


class ActivationAddition(HookingContextFactory):
    """Steering vectors from contrasting inputs at `(positive_key, in_key)` and `(negative_key, in_key)`.

    `clean_intermediate_keys` is accepted for tdhook's signature: no intermediate keys are written.
    """

    def __init__(
        self,
        modules_to_steer: list[str | Target],
        positive_key: NestedKey = "positive",
        negative_key: NestedKey = "negative",
        steer_key: NestedKey = "steer",
        clean_intermediate_keys: bool = True,
        cache_callback: Callable | None = None,
    ):
        super().__init__()
        self._targets = [activation_target(entry, argument="modules_to_steer") for entry in modules_to_steer]
        self._modules_to_steer = [path for path, _ in self._targets]
        self._positive_key = positive_key
        self._negative_key = negative_key
        self._steer_key = steer_key
        self._cache_callback = cache_callback

    @property
    def execution_spec(self) -> ExecutionSpec:
        """tdhook's count: two passes of the model (fused into one here where the inputs stack)."""
        return ExecutionSpec(model_passes=2)

    def forward(self, hooked, td: TensorDictBase) -> TensorDictBase:
        interface = hooked.interface
        refs = [refer(interface.root, interface.model, path) for path in self._modules_to_steer]
        activations = {}
        for role, group in (("positive", self._positive_key), ("negative", self._negative_key)):
            inputs = interface.inputs(
                td,
                group,
                f"the {role} examples that ActivationAddition contrasts",
                f"put the {role} inputs at td[{join_keys(group, interface.in_keys[0])!r}]",
            )
            table = hooked.sites(inputs)
            builder = ProgramBuilder()
            reads = []
            for ref, (_, target) in zip(refs, self._targets):
                read = self._read(builder, table, ref, target)
                if read is None:
                    raise never_called(ref.key, "it has no activation to contrast")
                reads.append(read)
            last = max(reads, key=lambda r: r.order)
            builder.add(ast.Stop(dsl_site(table, next(s for s in last.sites if s.order == last.order))))
            result = hooked.execute(builder, inputs)
            activations[role] = [read.tensor(result.saved, "a steering vector") for read in reads]
        dims = tuple(range(td.batch_dims))  # the mean over the TensorDict's batch dims, as tdhook
        vectors = {
            ref.key: (positive - negative).mean(dim=dims)
            for ref, positive, negative in zip(refs, activations["positive"], activations["negative"])
        }
        return TensorDict(
            {self._steer_key: TensorDict(vectors, batch_size=[])}, batch_size=[], device=td.device
        )

    def _read(self, builder, table, ref, target: Target | None) -> Read | None:
        """The module's output (through `cache_callback`), or a Target's units of it (`save M[..., i:j]`)."""
        cache_callback = self._cache_callback
        if target is None or cache_callback is None:
            callback = cache_callback
        else:

            def callback(**kwargs):
                return target.select_output(cache_callback(**kwargs))

        if target is None or cache_callback is not None:
            return add_read(builder, table, ref.key, ref.name, ref.module, "fwd", callback, key=ref.key)
        calls = table.calls(ref.name)
        if not calls:
            return None
        site, indexed = target_output(builder, table, ref.name, ref.module, target, calls - 1)
        return selected_read(ref.key, ref.module, site, builder.save(indexed))
