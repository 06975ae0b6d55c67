"""The pipeline every gradient attribution shares (tdhook's `GradientAttribution`), compiled.

A call `hooked(td)`:
1. reads the model inputs (the method may transform them: IG interpolates them) and makes the
   attributed ones fresh leaves that require grad (the caller's tensors are left unchanged);
2. runs the compiled program once: the model outputs, plus for each `input_modules` path its
   activation (`save PATH`) and a zero input whose gradient is the activation's gradient
   (`save grad PATH`), plus each `target_modules` output (`save PATH`);
3. builds the targets (model outputs and target-module outputs, by out_key and path, through
   `init_attr_targets`) and takes one `torch.autograd.grad` of all of them (summed, with
   `init_attr_grads` or ones) with respect to the attributed inputs and module activations;
4. turns gradients into attributions (`_grad_attr`, per method) at `(attribution_key, key)`.

No hook is installed: gradients with respect to inputs are plain autograd, with respect to
module outputs they come from the program's `save grad`. When nothing after the attributed
modules is needed (`use_outputs=False`), the program stops there (`stop SITE`), so the rest of
the model is not computed at all.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.capture import join_keys
from tdhook_fx.compiler.capture.sites import SiteTable
from tdhook_fx.compiler.resolve import match_sites
from tdhook_fx.errors import InvalidArgument, MissingInputKey, TdhookFxError
from tdhook_fx.execution import ExecutionSpec, GradientMode
from tdhook_fx.methods.context import HookingContextFactory, check_no_overlap
from tdhook_fx.methods.interface import ModelInterface
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult
from tdhook_fx.methods.reads import dsl_site, grad_callback
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import parse_site

INTERMEDIATE = ("_register_in", "_mod_in", "_mod_out", "_cache_in", "_cache_out")


@dataclass
class AttributionProgram:
    """What one attribution pass compiles: its statements, and the saved names it reads back."""

    builder: ProgramBuilder = field(default_factory=ProgramBuilder)
    activations: dict = field(default_factory=dict)  # input_modules path -> (saved value, saved gradient)
    targets: dict = field(default_factory=dict)  # target_modules path -> saved value


class GradientAttribution(HookingContextFactory):
    """Base of the gradient attributions; the parameters are tdhook's.

    - `use_inputs`: attribute to the model inputs (`init_attr_inputs` picks some of them).
    - `use_outputs`: the model outputs are targets; `target_modules` add module outputs
      (keyed by path) to the targets; `init_attr_targets(targets, additional)` selects from them.
    - `input_modules`: also attribute to these modules' outputs (latent attribution), results at
      `(attribution_key, path)`. A path is a site of the DSL: a module path (`transformer.h[0].mlp`)
      or a port of it (`transformer.h.0.attn:out.0`).
    - `init_attr_grads(targets, additional)`: the gradients the targets start from (ones).
    - `additional_init_keys`: TensorDict keys passed to the `init_*` callbacks; they may be model
      inputs too (an attention mask passed once), never model outputs.
    - `output_grad_callbacks`: {path: callback(module, grad_output, value, direction)} replacing
      the gradient at a module's output (tdhook's `bwd_pre` setting hook), compiled as `set grad`.
    - `clean_intermediate_keys=False` also writes `("_mod_in", key)`, `("_mod_out", key)` and
      `("_cache_in", path)`, as tdhook does (the metrics read `("_mod_out", out_key)`).
    - `per_target=True` (not in tdhook): each target of `init_attr_targets` gets its own
      attribution, at `(attribution_key, target, key)`, from the same forward pass (one backward
      per target) instead of the attribution of their sum.
    """

    def __init__(
        self,
        use_inputs: bool = True,
        use_outputs: bool = True,
        input_modules: list[str] | None = None,
        target_modules: list[str] | None = None,
        init_attr_targets: Callable | None = None,
        init_attr_inputs: Callable | None = None,
        init_attr_cache_in: Callable | None = None,
        init_attr_grads: Callable | None = None,
        additional_init_keys: list | None = None,
        output_grad_callbacks: dict[str, Callable] | None = None,
        attribution_key="attr",
        clean_intermediate_keys: bool = True,
        cache_callback: Callable | None = None,
        *,
        per_target: bool = False,
    ):
        super().__init__()
        if cache_callback is not None:
            raise TdhookFxError(
                "cache_callback is not supported: a compiled program attributes to a tensor it can name\n"
                "  hint: name the tensor with a port, e.g. input_modules=['transformer.h.0.attn:out.0']"
            )
        self._use_inputs = use_inputs
        self._use_outputs = use_outputs
        self._input_modules = list(input_modules or [])
        self._target_modules = list(target_modules or [])
        self._init_attr_targets = init_attr_targets
        self._init_attr_inputs = init_attr_inputs
        self._init_attr_cache_in = init_attr_cache_in
        self._init_attr_grads = init_attr_grads
        self._additional_init_keys = list(additional_init_keys or [])
        self._output_grad_callbacks = dict(output_grad_callbacks or {})
        self._attr_key = attribution_key
        self._clean_intermediate_keys = clean_intermediate_keys
        self._per_target = per_target

    # ---- the method protocol ------------------------------------------------------------------

    def check(self, interface: ModelInterface) -> None:
        # an in_key may also be an additional key (an attention mask the targets need): it is read, never written
        check_no_overlap(self._additional_init_keys, interface.out_keys, "Additional init keys must not be in the out_keys")

    @property
    def execution_spec(self) -> ExecutionSpec:
        """tdhook's: gradients are required (one pass of the model)."""
        return ExecutionSpec(gradient_mode=GradientMode.REQUIRED)

    def hooked_keys(self, interface: ModelInterface) -> tuple[list, list]:
        """The model inputs' keys (what the metrics perturb), and the keys the method writes."""
        attributed = list(interface.in_keys) if self._use_inputs else []
        return list(interface.in_keys), [join_keys(self._attr_key, k) for k in attributed + self._input_modules]

    def forward(self, hooked, td: TensorDictBase) -> TensorDictBase:
        for key, value in self.attributions(hooked, td).items():
            td.set(join_keys(self._attr_key, key), value)
        return td

    # ---- the program --------------------------------------------------------------------------

    def program(self, hooked, table: SiteTable) -> AttributionProgram:
        """The statements this method compiles into the model for inputs whose sites are `table`."""
        found = AttributionProgram()
        builder = found.builder
        self.add_rewrites(hooked, table, builder)
        named = []  # the sites the program names (a `stop` may follow the last of them)
        for path in self._input_modules:
            site = _one_site(table, path, "input_modules")
            named.append(site)
            found.activations[path] = (builder.save(dsl_site(table, site), "act"), builder.save(dsl_site(table, site), "grad", grad=True))
        for path in self._target_modules:
            site = _one_site(table, path, "target_modules")
            named.append(site)
            found.targets[path] = builder.save(dsl_site(table, site), "target")
        for path, callback in self._output_grad_callbacks.items():
            site = _one_site(table, path, "output_grad_callbacks")
            named.append(site)
            module = hooked.interface.model.get_submodule(site.module)
            function = builder.call(grad_callback(callback, module, "bwd_pre"), "output_grad", ast.SiteValue())
            builder.add(ast.Set(dsl_site(table, site), function, grad=True))
        self.add_statements(hooked, table, builder)
        if not self._use_outputs and named:  # nothing after the last named site is needed: cut the graph there
            builder.add(ast.Stop(dsl_site(table, max(named, key=lambda s: s.order))))
        return found

    def add_rewrites(self, hooked, table: SiteTable, builder: ProgramBuilder) -> None:
        """Statements that change the model's backward before anything reads it (LRP's rules): a
        module's `save grad` then sees what reaches its output, before its own rule."""

    def add_statements(self, hooked, table: SiteTable, builder: ProgramBuilder) -> None:
        """Statements a method adds to the program (guided backpropagation's gradient clamps)."""

    def run_program(self, hooked, inputs: tuple) -> tuple[AttributionProgram, ProgramResult]:
        """Build and run the program once on `inputs` (model inputs in call order)."""
        program = self.program(hooked, hooked.sites(inputs))
        return program, hooked.execute(program.builder, inputs)

    # ---- one call -----------------------------------------------------------------------------

    def attributions(self, hooked, td: TensorDictBase) -> dict:
        """The attributions for `td`, by input key and module path (also writes the intermediates)."""
        interface: ModelInterface = hooked.interface
        batch = tuple(td.batch_size)
        inputs = {k: _read(td, k, "model input") for k in interface.in_keys}
        additional = td.select(*self._additional_init_keys)
        attributed = self._attributed_inputs(inputs, additional)
        call_inputs, shape = self.model_inputs(td, inputs, attributed, batch)
        leaves = {k: call_inputs[k].detach().requires_grad_(True) for k in attributed}
        ordered = tuple(leaves.get(k, call_inputs[k]) for k in interface.in_keys)
        with torch.enable_grad():
            program, result = self.run_program(hooked, ordered)
            outputs = list((result.outputs or {}).values())
            targets = self._targets(interface, program, outputs, result.saved, shape, additional)
            activations = {p: result.saved[act] for p, (act, _) in program.activations.items()}
            wrt = dict(leaves)
            wrt.update(self._module_grad_inputs(program, activations, result.grad_deltas, shape, additional))
            per_target = self._gradients(targets, wrt, additional)
        values = {k: inputs[k] if k in inputs else _unflatten(activations[k], shape).detach() for k in wrt}
        attributions = {}
        for target, grads in per_target.items():
            grads = {k: _unflatten(g, shape) for k, g in grads.items()}
            attributions[target] = self._grad_attr(self.reduce_grads(grads, batch), values)
        attributions = self.finish(hooked, td, attributions, call_inputs, attributed, batch, additional)
        if not self._clean_intermediate_keys:
            self._write_intermediates(td, interface, ordered, outputs, activations, shape)
        return {
            key if target is None else join_keys(target, key): value
            for target, found in attributions.items()
            for key, value in found.items()
        }

    # ---- steps a method may change ------------------------------------------------------------

    def model_inputs(self, td, inputs: dict, attributed: list, batch: tuple) -> tuple[dict, tuple]:
        """The tensors the model is called with (batch dims flattened) and the batch shape of its results."""
        return {k: _flatten(x, len(batch)) for k, x in inputs.items()}, batch

    def reduce_grads(self, grads: dict, batch: tuple) -> dict:
        """Gradients shaped like the results' batch, reduced to the TensorDict's batch."""
        return grads

    @abstractmethod
    def _grad_attr(self, grads: dict, values: dict) -> dict:
        """Attributions from the gradients (per key) and the values they are gradients of."""

    def finish(self, hooked, td, attributions: dict, call_inputs, attributed, batch, additional) -> dict:
        """Last changes to the attributions {target (None: all together): {key: attribution}}
        (IG multiplies by inputs and checks convergence here)."""
        return attributions

    # ---- helpers ------------------------------------------------------------------------------

    def _attributed_inputs(self, inputs: dict, additional) -> list:
        if self._init_attr_inputs is not None and self._use_inputs:
            chosen = self._init_attr_inputs(TensorDict(inputs, batch_size=[]), additional)
            if not isinstance(chosen, TensorDictBase):
                raise InvalidArgument("init_attr_inputs function must return a TensorDict")
            keys = [k for k in inputs if _plain(k) in set(map(_plain, chosen.keys(True, True)))]
        elif self._use_inputs:  # integer inputs (token ids, masks) have no gradient: skip them
            keys = [k for k, x in inputs.items() if x.is_floating_point()] or list(inputs)
        else:
            keys = []
        for key in keys:
            if not inputs[key].is_floating_point():
                raise TdhookFxError(
                    f"cannot attribute to the input {key!r}: it holds {str(inputs[key].dtype).removeprefix('torch.')} "
                    "values, which have no gradient\n"
                    "  hint: attribute to the embeddings instead: use_inputs=False, input_modules=['<embedding path>'],"
                    " or pass the embeddings (Hugging Face: in_keys={'inputs_embeds': 'embeds'})"
                )
        return keys

    def _targets(self, interface, program: AttributionProgram, outputs, saved: dict, shape: tuple, additional) -> TensorDictBase:
        """The targets from one pass's flat results (batch dims merged), shaped `shape`."""
        values = self._target_values(interface, program, outputs, saved, lambda value: _unflatten(value, shape))
        return self._select_targets(values, shape, additional)

    def _target_values(self, interface, program: AttributionProgram, outputs, saved: dict, shaped: Callable) -> dict:
        """The model outputs (by out_key) and target-module outputs (by path), each passed through `shaped`."""
        values = {}
        if self._use_outputs:
            values.update({k: shaped(o) for k, o in zip(interface.out_keys, outputs)})
        for path, name in program.targets.items():
            values[path] = shaped(saved[name])
        return values

    def _select_targets(self, values: dict, shape: tuple, additional) -> TensorDictBase:
        """`init_attr_targets` applied to the values (batch `shape`); it must keep that batch."""
        targets = TensorDict(values, batch_size=shape)
        if self._init_attr_targets is not None:
            targets = self._init_attr_targets(targets, additional)
            if not isinstance(targets, TensorDictBase):
                raise InvalidArgument("init_attr_targets function must return a TensorDict")
            if tuple(targets.batch_size) != tuple(shape):
                raise InvalidArgument(
                    f"init_attr_targets returned a TensorDict of batch size {list(targets.batch_size)}; it was given "
                    f"batch size {list(shape)} and must keep it (one target per example)\n"
                    "  hint: return TensorDict(..., batch_size=outputs.batch_size)"
                )
        return targets

    def _module_grad_inputs(self, program: AttributionProgram, activations: dict, deltas: dict, shape: tuple, additional) -> dict:
        chosen = list(activations)
        if self._init_attr_cache_in is not None and chosen:
            given = TensorDict({p: _unflatten(a, shape) for p, a in activations.items()}, batch_size=shape)
            selected = self._init_attr_cache_in(given, additional)
            if not isinstance(selected, TensorDictBase):
                raise InvalidArgument("init_attr_cache_in function must return a TensorDict")
            chosen = [p for p in chosen if p in set(selected.keys(True, True))]
        return {p: deltas[program.activations[p][1]] for p in chosen}

    def _gradients(self, targets: TensorDictBase, wrt: dict, additional) -> dict:
        """{None: gradients of the targets' sum}, or with per_target {target: its gradients}, by key."""
        if not wrt:
            raise TdhookFxError(
                "nothing to attribute to: use_inputs is False and no input_modules are given\n"
                "  hint: set use_inputs=True or name modules in input_modules"
            )
        names = list(targets.keys(True, True))
        tensors = [targets.get(n) for n in names]
        for name, tensor in zip(names, tensors):
            if tensor.grad_fn is None:
                raise InvalidArgument(
                    f"Target {name} has no grad_fn: it does not depend on what is attributed\n"
                    "  hint: init_attr_targets must return values computed from the outputs it receives"
                )
        if self._init_attr_grads is not None:
            init = self._init_attr_grads(targets, additional)
            if not isinstance(init, TensorDictBase):
                raise InvalidArgument("init_attr_grads function must return a TensorDict")
            if init.batch_size != targets.batch_size:
                raise InvalidArgument("init_grads should have the same batch size as targets")
            if set(init.keys(True, True)) != set(names):
                raise InvalidArgument("Targets and init_grads must have the same keys")
            starts = [init.get(n) for n in names]
        else:
            starts = [torch.ones_like(t) for t in tensors]
        inputs = list(wrt.values())
        if not self._per_target:
            grads = torch.autograd.grad(tensors, inputs, starts, allow_unused=True)
            return {None: _fill(wrt, grads)}
        found = {}
        for i, (name, tensor, start) in enumerate(zip(names, tensors, starts)):
            grads = torch.autograd.grad(tensor, inputs, start, retain_graph=i < len(names) - 1, allow_unused=True)
            found[name] = _fill(wrt, grads)
        return found

    def _write_intermediates(self, td, interface, ordered, outputs, activations, shape) -> None:
        for key, value in zip(interface.in_keys, ordered):
            td.set(join_keys("_register_in", key), _unflatten(value.detach(), shape))
            td.set(join_keys("_mod_in", key), _unflatten(value.detach(), shape))
        for key, value in zip(interface.out_keys, outputs):
            td.set(join_keys("_mod_out", key), _unflatten(value.detach(), shape))
        for path, value in activations.items():
            td.set(join_keys("_cache_in", path), _unflatten(value.detach(), shape))


def _one_site(table: SiteTable, path: str, what: str):
    """The one site that `path` (DSL site text, e.g. `transformer.h[0].mlp` or `h.0.attn:out.0`) names."""
    sites = match_sites(table, parse_site(path, source=what))
    if len(sites) != 1:
        names = ", ".join(s.name for s in sites)
        raise InvalidArgument(
            f"{what} entry {path!r} names {len(sites)} tensors ({names}); it must name one\n"
            f"  hint: pick one with a port, e.g. '{sites[0].name}'"
        )
    return sites[0]


def _fill(wrt: dict, grads) -> dict:
    """Gradients by key; zeros where the targets do not depend on the value."""
    return {k: torch.zeros_like(w) if g is None else g for (k, w), g in zip(wrt.items(), grads)}


def _read(td: TensorDictBase, key, what: str) -> torch.Tensor:
    value = td.get(key, None)
    if not isinstance(value, torch.Tensor):
        raise MissingInputKey(
            f"the TensorDict has no {what} at {key!r}; its keys: "
            f"{sorted(map(str, td.keys(include_nested=True, leaves_only=True)))}"
        )
    return value


def _plain(key):
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key


def _flatten(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """The batch dims merged into one (a model sees one batch dimension); none stay none."""
    return x if batch_dims == 0 else x.reshape(-1, *x.shape[batch_dims:])


def _unflatten(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The flat batch dim of a result split back into `shape`."""
    return x if not shape else x.reshape(*shape, *x.shape[1:])
