"""ActivationPatching: run the patched inputs with activations taken from the clean run.

tdhook's semantics: the model runs on the clean inputs (`in_keys`, writing `out_keys`) and on
the patched inputs (`(patch_key, in_key)`, writing `(patch_key, out_key)`); in the patched run
each listed module's output is replaced by its clean value, or by
`patch_fn(module_key=..., output=patched_value, output_to_patch=clean_value)`.

Compiled as one fused pass: the clean and patched inputs are stacked along the batch and
`set SITE = $patch_fn_0(value)` splits the site's value in two halves, keeps the clean half
and replaces the patched half. That is exact when batch elements do not interact (a model
in eval mode). In training mode, or where the inputs cannot be stacked, the program is
`patch SITE from clean with $patch_fn_0` (the compiler's fused source prefix) on the patched
inputs, plus a plain compiled pass on the clean inputs.

A `Target` entry patches its units only (`set M[..., 2:3] = $patch_fn_0(value)`); tdhook's
`cache_callback(module, args, output, key, direction)` transforms the clean value inside the
fused pass (the module's clean inputs are saved for it: `$patch_fn_0(value, @args_0)`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.errors import PatchShapeError, TdhookFxError
from tdhook_fx.execution import ExecutionSpec
from tdhook_fx.methods.context import HookingContextFactory
from tdhook_fx.methods.interface import never_called
from tdhook_fx.methods.paths import refer
from tdhook_fx.methods.programs import ProgramBuilder
from tdhook_fx.methods.reads import add_replace, dsl_site, ports, save_inputs
from tdhook_fx.methods.targets import target_output
from tdhook_fx.syntax import ast
from tdhook_fx.targets import Target, activation_target

CLEAN_SOURCE = "clean"


class ActivationPatching(HookingContextFactory):
    """Patch the listed modules' outputs into the run on `(patch_key, in_key)`.

    `clean_intermediate_keys` is accepted for tdhook's signature: one fused pass leaves no
    intermediate keys to clean.
    """

    def __init__(
        self,
        modules_to_patch: list[str | Target],
        patch_key: NestedKey = "patched",
        clean_intermediate_keys: bool = True,
        patch_fn: Callable | None = None,
        cache_callback: Callable | None = None,
    ):
        super().__init__()
        self._targets = [activation_target(entry, argument="modules_to_patch") for entry in modules_to_patch]
        self._modules_to_patch = [path for path, _ in self._targets]
        self._patch_key = patch_key
        self._patch_fn = patch_fn
        self._cache_callback = cache_callback

    @property
    def execution_spec(self) -> ExecutionSpec:
        """tdhook's count: two passes of the model (fused into one here where the inputs stack)."""
        return ExecutionSpec(model_passes=2)

    def forward(self, hooked, td: TensorDictBase) -> TensorDictBase:
        interface = hooked.interface
        clean = interface.inputs(td)
        patched = interface.inputs(
            td,
            self._patch_key,
            "the inputs of the patched run",
            f"put the source inputs at td[{join_keys(self._patch_key, interface.in_keys[0])!r}]",
        )
        refs = [refer(interface.root, interface.model, path) for path in self._modules_to_patch]
        if self._can_stack(hooked, td, clean, patched):
            clean_outputs, patched_outputs = self._stacked(hooked, refs, clean, patched)
        elif self._cache_callback is not None:
            raise TdhookFxError(
                "ActivationPatching's cache_callback runs inside the fused pass over the clean and patched inputs, "
                "which needs the model in eval mode and both inputs of the same shapes\n"
                "  hint: call model.eval(), or transform the clean value in patch_fn(module_key, output, output_to_patch)"
            )
        else:
            clean_outputs, patched_outputs = self._with_source(hooked, refs, clean, patched)
        for key, value in clean_outputs.items():
            td.set(key, value)
        for key, value in patched_outputs.items():
            td.set(join_keys(self._patch_key, key), value)
        return td

    def _can_stack(self, hooked, td, clean, patched) -> bool:
        return (
            not hooked.interface.model.training
            and td.batch_dims >= 1
            and all(c.shape == p.shape and c.dtype == p.dtype for c, p in zip(clean, patched))
        )

    def _stacked(self, hooked, refs, clean, patched):
        """One pass on [clean; patched]: each site's patched half takes the clean half's value."""
        inputs = tuple(torch.cat([c, p]) for c, p in zip(clean, patched))
        half = clean[0].shape[0]
        table = hooked.sites(inputs)
        builder = ProgramBuilder()
        for ref, (_, target) in zip(refs, self._targets):
            for call in range(_calls(table, ref)):
                arguments = () if self._cache_callback is None else save_inputs(builder, table, ref.name, call)

                def patch_halves(value, *args, _ref=ref):
                    source, patched = value[:half], value[half:]
                    if self._cache_callback is not None:  # tdhook's capture callback, on the clean call
                        clean_args = tuple(a[:half] for a in args)
                        source = self._cache_callback(
                            module=_ref.module, args=clean_args, output=source, key=_ref.key, direction="fwd"
                        )
                    return torch.cat([value[:half], self._replacement(_ref.key, patched, source)])

                if target is None:
                    add_replace(builder, table, ref.key, ref.name, call, patch_halves, *arguments, prefix="patch_fn")
                else:  # the Target's units only: `set M[..., i:j] = $patch_fn_0(value)`
                    _, site = target_output(builder, table, ref.name, ref.module, target, call)
                    function = builder.call(patch_halves, "patch_fn", ast.SiteValue(), *arguments)
                    builder.add(ast.Set(site, function))
        result = hooked.execute(builder, inputs)
        outputs = result.outputs
        return {k: v[:half] for k, v in outputs.items()}, {k: v[half:] for k, v in outputs.items()}

    def _with_source(self, hooked, refs, clean, patched):
        """`patch SITE from clean with $f` on the patched inputs, and a plain pass on the clean ones."""
        table = hooked.sites(patched)
        builder = ProgramBuilder()
        for ref, (_, target) in zip(refs, self._targets):
            for call in range(_calls(table, ref)):

                def patch_value(patched, source, _key=ref.key):
                    return self._replacement(_key, patched, source)

                function = builder.var("patch_fn", patch_value)
                if target is not None:
                    _, site = target_output(builder, table, ref.name, ref.module, target, call)
                    builder.add(ast.Patch(site, CLEAN_SOURCE, function))
                    continue
                sites = ports(table, ref.name, "out", call)
                if len(sites) != 1:
                    raise TdhookFxError(f"{ref.key} produces {len(sites)} tensors; patching needs one")
                builder.add(ast.Patch(dsl_site(table, sites[0]), CLEAN_SOURCE, function))
        plain = hooked.execute(ProgramBuilder(), clean)
        result = hooked.execute(builder, patched, sources={CLEAN_SOURCE: clean})
        return plain.outputs, result.outputs

    def _replacement(self, key: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if self._patch_fn is None:
            return source
        value = self._patch_fn(module_key=key, output=target, output_to_patch=source)
        if value is None:
            return source
        if not isinstance(value, torch.Tensor) or value.shape != target.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PatchShapeError(
                f"patch_fn returned {got} at {key}, whose activation has shape {tuple(target.shape)}\n"
                "  hint: return a tensor shaped like `output` (or None to use `output_to_patch`)"
            )
        return value


def _calls(table, ref) -> int:
    count = table.calls(ref.name)
    if not count:
        raise never_called(ref.key, "it cannot be patched")
    return count

