"""CompiledModule: the rewritten graph behind a TensorDict (or plain tensor) interface."""

from __future__ import annotations

import difflib
import reprlib
import threading
import weakref

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.compiler import call_path
from tdhook_fx.compiler.call_path import check_batch, runner_of
from tdhook_fx.compiler.capture import Capture, join_keys, key_name
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.capture.state import guard, rebind, state_key
from tdhook_fx.compiler.graphs import fetch_attr
from tdhook_fx.compiler.ir import has_runtime_values
from tdhook_fx.compiler.lru import LRU
from tdhook_fx.compiler.passes.grad import region_shape, site_shapes
from tdhook_fx.compiler.values import runtime_entry
from tdhook_fx.compiler.variants import Variant, build, carry_tensors, check_same_interface, own_tensors
from tdhook_fx.errors import BindingError, ExportError, TdhookFxError
from tdhook_fx.syntax.ast import variables

SAVED = "saved"
GRAD_DELTA = "_grad_delta"  # the zero inputs whose gradients `save grad` returns (see read_grads)
VARIANTS_PER_MODULE = 8  # states of the model (dtype, device, mode, ...) a module keeps a rewrite for
DELTA_SHAPES_PER_MODULE = 16  # input shapes a `save grad` module keeps its gradient inputs' shapes for


class CompiledModule(nn.Module):
    """A model with a program compiled into its graph: no hooks, printable, exportable.

    Call it with a TensorDict (model inputs at `in_keys`, runtime values `$name` at key
    `name`, patch sources at `(source, in_key)`): it writes the model outputs at `out_keys`
    and every saved value at `("saved", name)` into that TensorDict and returns it. Or call it
    with the input tensors (runtime values and patch sources as keywords): it returns a dict
    `{out_key: tensor, ..., "saved": {name: tensor}}`.

    It follows the model: after `model.half()`, `model.to("cuda")`, `model.train()`, an in-place
    edit or a new submodule, a call gives what a fresh compile would give. Each state of the
    model gets its own rewrite (made on the first call in that state, from a capture cached per
    state; see `tdhook_fx.compiler.variants`). `cm.to(...)`, `cm.half()`, `cm.train()` and
    `cm.eval()` act on the model too (the module shares its weights), and `cm.training` is the
    model's mode.

    Gradients (`save grad`): with gradients enabled, a call also puts one zero tensor per saved
    gradient at `("_grad_delta", name)` (or `result["_grad_delta"][name]`); after a backward
    through the outputs, `cm.read_grads(td)` moves their gradients to `("saved", name)`.

    What was compiled, for reading (tools such as `tdhook_fx.shipping` use only these):
    `program` (canonical text), `resolved` (the `ResolvedProgram`; `print(cm.resolved)` lists
    each statement's sites), `code`, `graph`, `graph_module`, `sites` (the `SiteTable`),
    `frontend`, `in_keys`, `out_keys` (none after a `stop`), `captured_out_keys`, `runtime_names`,
    `saved_names`, `grad_names`, `patch_inputs` (the graph's inputs after the runtime values),
    `base_model`, `example_inputs`, `example(...)`, `graph_tensors()` and `bound_values()`. They
    describe the rewrite for the model's state at the last call.
    """

    def __init__(self, variant: Variant, model: nn.Module, inputs: tuple, *, source: str = "program", hold_model: bool = True):
        """`hold_model=False` for a module cached by its caller under the model (weakly): it then
        holds the model weakly too, so that the cache entry does not keep its own key alive."""
        super().__init__()
        self._source = source
        self._model = weakref.ref(model)
        self.__dict__["_held_model"] = model if hold_model else None  # `cm = compile(Model(), ...)` keeps it
        self._first = variant.rewritten  # what every variant must take and return
        self._variants = LRU(VARIANTS_PER_MODULE)
        self._follow_lock = threading.RLock()
        self.example_inputs: tuple[torch.Tensor, ...] | None = None  # the example compiled on (save/export)
        self._bound: dict[str, str] = {}  # runtime name -> buffer name
        self._functions: dict[str, object] = {}  # runtime name -> bound Python function
        self._use(variant)
        self._variants.put(_variant_key(model, variant.capture, inputs), variant)

    def _use(self, variant: Variant) -> None:
        """Make `variant` the one calls run and the read surface describes."""
        self.graph_module = variant.rewritten.graph_module
        self.sites = variant.sites
        self.resolved = variant.resolved
        self.frontend = variant.capture.frontend
        self.capture_seconds = variant.capture.seconds
        self.in_keys = list(variant.capture.plan.in_keys)
        self.out_keys = list(variant.capture.plan.out_keys) if variant.rewritten.returns_model_outputs else []
        self._rewritten = variant.rewritten
        self.capture = variant.capture  # the captured graph this module was rewritten from (cached per model)
        self._grad_sites = {i.name: i for i in variant.resolved.interventions if i.kind == "save_grad"}
        self._delta_shapes = LRU(DELTA_SHAPES_PER_MODULE)  # input shapes -> (site shape, delta shape or None) per saved grad
        compile_args = self.__dict__.get("_compile_args")
        if compile_args is not None:
            object.__setattr__(self, "_compiled_graph", torch.compile(self.graph_module, *compile_args[0], **compile_args[1]))
        self.__dict__["_variant"] = variant
        self.__dict__["_fast"] = call_path.fast_call(self, variant)

    # ---- what was compiled --------------------------------------------------------------------

    @property
    def program(self) -> str:
        """The program, in canonical DSL text."""
        return str(self.resolved.program)

    @property
    def code(self) -> str:
        """The rewritten forward, as Python (after a comment naming the site each TransformerLens
        name of the program stands for, if it has any)."""
        if not self.resolved.aliases:
            return self.graph_module.code
        names = "".join(f"#   {written} = {own}\n" for written, own in self.resolved.aliases)
        return "# TransformerLens names in the program, and this model's sites they stand for:\n" + names + self.graph_module.code

    @property
    def graph(self):
        return self.graph_module.graph

    @property
    def runtime_names(self) -> tuple[str, ...]:
        """The program's runtime values (`$name`), in the order the graph takes them."""
        return self._rewritten.runtime_names

    @property
    def saved_names(self) -> tuple[str, ...]:
        """The names of the saved values, in the order the graph returns them."""
        return self._rewritten.saved_names

    @property
    def patch_inputs(self) -> tuple[tuple[str, object], ...]:
        """`(source, in_key)` for each graph input a patch reads, after the runtime values.

        A TensorDict call reads them at `(source, in_key)`; a tensor call takes `source=(tensors...)`.
        """
        return tuple((source, self.in_keys[i]) for source, i in self._rewritten.source_inputs)

    @property
    def captured_out_keys(self) -> list:
        """The out_keys the model was captured with (`out_keys` is empty after a `stop`)."""
        return list(self.capture.plan.out_keys)

    @property
    def base_model(self) -> nn.Module:
        """The user's model this module was compiled from (shared, never changed)."""
        return self.sites.modules[""]

    def example(self, example=None) -> tuple[torch.Tensor, ...]:
        """The example inputs as tensors: `example` (a TensorDict or tensors) if given, else the
        inputs this module was compiled on."""
        if example is not None:
            return example_inputs(example, self.in_keys)
        if self.example_inputs is None:
            raise ExportError(
                "this compiled module does not know the example inputs it was compiled on\n"
                "  hint: pass them: cm.save(path, example=td) or cm.export(path, example=td) (the TensorDict "
                "or tensors given to tdhook_fx.compile)"
            )
        return tuple(self.example_inputs)

    def graph_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the rewrite stored in the graph module itself (pruning masks), by attribute name."""
        found = {}
        for node in self.graph.nodes:
            if node.op == "get_attr" and not node.target.startswith("model."):
                value = fetch_attr(self.graph_module, node.target)
                if isinstance(value, torch.Tensor):
                    found[node.target] = value
        return found

    def __repr__(self) -> str:
        return f"CompiledModule(frontend={self.frontend!r}, program=\n{self.program}\n)"

    # ---- runtime values -----------------------------------------------------------------------

    def bind(self, **values) -> CompiledModule:
        """Set runtime values (`$name`) shared by every call; a TensorDict key of the same name wins.

        Tensors are stored as buffers, so changing them needs no recompilation; a Python
        function (for `$f(...)` or `patch ... with $f`) is kept as it is. A later bind of a name
        replaces the earlier value, function or tensor. Raises `BindingError` for a value that
        is neither a function nor convertible to a tensor with data (a str, None, a meta tensor).
        """
        for name in values:
            if name not in self.runtime_names:
                raise BindingError(_unknown_name(name, self.runtime_names))
        values = {name: runtime_value(name, value) for name, value in values.items()}  # all checked, then bound
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                self._functions[name] = value
                if name in self._bound:
                    del self._buffers[self._bound.pop(name)]
                continue
            self._functions.pop(name, None)
            buffer = f"bound_{name}"
            if name in self._bound:
                getattr(self, buffer).data = value
            else:
                self.register_buffer(buffer, value)
                self._bound[name] = buffer
        return self

    def _runtime(self, name: str, given) -> torch.Tensor:
        if given is not None:
            return runtime_value(name, given)
        if name in self._functions:
            return self._functions[name]
        if name in self._bound:
            return getattr(self, self._bound[name])
        users = [i.describe() for i in self.resolved.interventions if name in variables(i.statement)]
        raise BindingError(
            f"no value for ${name}, which {'; '.join(dict.fromkeys(users))} needs\n"
            f"  hint: put it in the input TensorDict (td['{name}'] = value) or bind it once: cm.bind({name}=value)"
        )

    def bound_values(self) -> dict[str, object]:
        """The runtime values bound with `bind`: tensors (buffers) and functions, by name."""
        values: dict[str, object] = {name: getattr(self, buffer) for name, buffer in self._bound.items()}
        values.update(self._functions)
        return values

    # ---- shipping (io.py, standalone.py, draw.py) ---------------------------------------------

    def save(self, path, *, example=None):
        """Write the program, capture settings and bound tensors to `path` (safetensors: no code).

        Load it back onto the same base model with `tdhook_fx.load(path, model)`.
        """
        from tdhook_fx.shipping.save import save

        return save(self, path, example=example)

    def export(self, path, *, example=None):
        """Write a standalone `torch.export` archive (.pt2) of this module; see `tdhook_fx.shipping.export`."""
        from tdhook_fx.shipping.export import export

        return export(self, path, example=example)

    def draw(self, path, **options):
        """Draw the rewritten graph to `path` (.svg, .html or .dot); see `tdhook_fx.shipping.draw`."""
        from tdhook_fx.shipping.draw import draw

        return draw(self, path, **options)

    def generate(self, inputs, max_new_tokens: int | None = None, **generation_kwargs):
        """Generate text with this program applied at every position the model computes (a KV cache).

        `inputs`: a TensorDict holding the in_keys (token ids, and an attention mask for left
        padding) and any runtime values, or the token ids. `generation_kwargs` are
        `model.generate`'s (greedy, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`,
        `pad_token_id`, `attention_mask`, `output_logits`, `output_scores`), plus `compile=True`
        (or a dict of `torch.compile` options) to run the decoding step under `torch.compile`.
        Returns a TensorDict with "sequences" and ("saved", name); see `tdhook_fx.generation`.
        """
        from tdhook_fx.generation.calls import generate_compiled

        return generate_compiled(self, inputs, max_new_tokens, **generation_kwargs)

    # ---- calling ------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile traces the general call
            return self._call_making_grad_inputs(args, kwargs) if self._first.grad_names else self._call(args, kwargs)
        return self.__dict__["_fast"](self, args, kwargs)  # call_path: the generated call, or the general one

    def _call(self, args, kwargs):
        """The call, for any arguments (the generated eager call, `call_path`, defers to it).

        `cm(td, name=value)` gives runtime values for this call only, next to a TensorDict (they
        win over its entries of the same name), as `cm(*tensors, name=value)` does."""
        if len(args) == 1 and isinstance(args[0], TensorDictBase):
            for name in kwargs:
                if name not in self.runtime_names:
                    raise BindingError(_unknown_name(name, self.runtime_names))
            return self._call_tensordict(args[0], kwargs)
        return self._call_tensors(args, kwargs)

    @torch.compiler.disable(recursive=False)
    def _call_making_grad_inputs(self, args, kwargs):
        """The call of a program with `save grad`, which makes its zero gradient inputs here.

        torch.compile cannot make tensors that require gradients inside a graph, so under
        `torch.compile(cm)` this wrapper runs eagerly and only the rewritten graph it calls is
        compiled: one graph, no break.
        """
        return self._call(args, kwargs)

    def _call_tensordict(self, td: TensorDictBase, values: dict | None = None) -> TensorDictBase:
        inputs = [_get(td, key, "model input") for key in self.in_keys]
        variant = self._variant_for(inputs)
        values = values or {}
        runtime = [
            self._runtime(name, values[name] if name in values else runtime_entry(td, name)) for name in self.runtime_names
        ]
        sources = [_get(td, join_keys(source, key), "patch source") for source, key in self.patch_inputs]
        deltas = self._grad_deltas(inputs, runtime)
        outputs = self._run_graph(variant, *inputs, *runtime, *sources, *deltas)
        keys = [*self.out_keys, *((SAVED, name) for name in self.saved_names)]
        if deltas and deltas[0].requires_grad:
            keys, outputs = keys + [(GRAD_DELTA, name) for name in self.grad_names], (*outputs, *deltas)
        for key, value in zip(keys, outputs):
            check_batch(td, key, value)
            td.set(key, value)
        return td

    def _call_tensors(self, args, kwargs) -> dict:
        if len(args) != len(self.in_keys):
            raise BindingError(
                f"expected {len(self.in_keys)} input tensor(s) ({', '.join(map(key_name, self.in_keys))}), got {len(args)}"
            )
        variant = self._variant_for(args)
        kwargs = dict(kwargs)
        runtime = [self._runtime(name, kwargs.pop(name, None)) for name in self.runtime_names]
        sources = []
        for source in dict.fromkeys(s for s, _ in self.patch_inputs):
            if source not in kwargs:
                raise BindingError(f"the program patches from '{source}': pass {source}=(source inputs...)")
            given = kwargs.pop(source)
            sources.extend(given if isinstance(given, (tuple, list)) else (given,))
        if kwargs:
            raise BindingError(_unknown_name(next(iter(kwargs)), self.runtime_names))
        deltas = self._grad_deltas(args, runtime)
        outputs = self._run_graph(variant, *args, *runtime, *sources, *deltas)
        result = dict(zip(map(key_name, self.out_keys), outputs))
        if self.saved_names:
            result[SAVED] = dict(zip(self.saved_names, outputs[len(self.out_keys) :]))
        if deltas and deltas[0].requires_grad:
            result[GRAD_DELTA] = dict(zip(self.grad_names, deltas))
        return result

    def compile(self, *args, **kwargs) -> CompiledModule:
        """`torch.compile` the rewritten graph in place; the argument handling around it stays eager.

        `torch.compile(cm)` works too, and traces the wrapper as well (TensorDict reads and
        writes), which lets a larger compiled function call `cm` without a break; `cm.compile(...)`
        compiles the graph alone (again for each state of the model it follows). Arguments are
        `torch.compile`'s.
        """
        self.__dict__["_compile_args"] = (args, kwargs)
        object.__setattr__(self, "_compiled_graph", torch.compile(self.graph_module, *args, **kwargs))
        self.__dict__["_fast"] = call_path.fast_call(self, self.__dict__["_variant"])  # the eager one runs no compiled graph
        return self

    def _run_graph(self, variant: Variant, *inputs):
        """The rewritten graph's forward, called directly: going through `nn.Module.__call__` (hook
        dispatch, fx's error-printing wrapper) costs more than a small model's own layers take.
        Nothing hooks the internal graph module, and an error keeps its full traceback.

        Eagerly it runs on `tdhook_fx.compiler.runner`'s copy, with attribute paths resolved once (under
        torch.compile attribute lookups cost nothing, and the copy need not be traced)."""
        compiled = self.__dict__.get("_compiled_graph")
        if compiled is not None:
            return compiled(*inputs)
        if torch.compiler.is_compiling():
            return variant.rewritten.graph_module.forward(*inputs)
        return runner_of(variant).forward(*inputs)

    # ---- following the model ------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """Whether the model is in training mode: the module follows the model's mode (one
        rewrite per mode), so this is the mode calls run in."""
        model = self.__dict__.get("_model")
        model = model() if model is not None else None
        return model.training if model is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode  # nn.Module.__init__ sets it; the model's own flag rules

    def train(self, mode: bool = True) -> CompiledModule:
        """Switch the model's mode (it is shared, like its weights); the next call follows it."""
        model = self._model()
        if model is None:
            raise TdhookFxError("the model this module was compiled from no longer exists")
        model.train(mode)
        self.__dict__["_training"] = mode
        return self

    def _variant_for(self, inputs) -> Variant:
        """The variant for the model's state now (the current one while its guard holds)."""
        variant = self.__dict__["_variant"]
        if variant.guard(tuple(inputs)):
            return variant
        return self._follow(tuple(inputs))

    @torch.compiler.disable
    def _follow(self, inputs: tuple) -> Variant:
        """The model changed since the current variant was made: use (or make) the one for its
        state now. A new one is the program resolved and rewritten again, on a capture of the
        model as it is (cached per state), with the masks this module computed when compiled."""
        with self._follow_lock:
            current = self.__dict__["_variant"]
            if current.guard(inputs):  # another thread followed meanwhile
                return current
            model = self._model()
            if model is None:
                raise TdhookFxError(
                    "the model this module was compiled from no longer exists, and the submodules it runs "
                    "have changed\n  hint: keep a reference to the model, or compile again"
                )
            key = _variant_key(model, current.capture, inputs)
            variant = self._variants.get(key)
            if variant is not None and not variant.guard(inputs) and rebind(variant.rewritten.graph_module, model):
                variant.runner = None  # the model holds new tensors of the same kind (`.to()` and back)
                variant.guard = guard(model, variant.follows, inputs)
            if variant is None or not variant.guard(inputs):
                variant = self._build_variant(model, inputs, current)
                self._variants.put(key, variant)
            self._use(variant)
            return variant

    def _build_variant(self, model: nn.Module, inputs: tuple, current: Variant) -> Variant:
        plan = current.capture.plan
        resolved = current.resolved
        try:
            variant = build(
                model, resolved.program, resolved.text, self._source, inputs, plan.in_keys, plan.out_keys,
                current.capture.frontend,
            )
        except TdhookFxError as error:
            error.add_note("(the model changed since this module was compiled: a new rewrite was needed)")
            raise
        check_same_interface(self._first, variant.rewritten)
        carry_tensors(current.rewritten.graph_module, variant.rewritten.graph_module)
        if not variant.guard(inputs):
            raise TdhookFxError("internal error: a rewrite made for the model's state does not fit it")
        return variant

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()` ...: convert the model (shared, so it changes for everyone,
        consistently: parameters and buffers alike), the bound values and the rewrite's own
        tensors (pruning masks). The next call follows the model."""
        model = self._model()
        if model is None:  # only the graph holds the model's tensors now
            return super()._apply(fn, recurse)
        model._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = fn(buffer)
        graph_module = self.__dict__["_variant"].rewritten.graph_module
        for name, tensor in own_tensors(graph_module).items():
            setattr(graph_module, name, fn(tensor))
        self._forget_other_variants()  # their masks were not converted
        return self

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._forget_other_variants()  # assign=True replaces tensors the runner names
        return result

    def _forget_other_variants(self) -> None:
        variant = self.__dict__["_variant"]
        variant.runner = None
        self._variants.clear()
        self.__dict__["_fast"] = call_path.fast_call(self, variant)

    # ---- gradients (save grad) ----------------------------------------------------------------

    @property
    def grad_names(self) -> tuple[str, ...]:
        """The names of the saved gradients (`save grad`), as `read_grads` stores them."""
        return self._rewritten.grad_names

    def read_grads(self, result):
        """After a backward through `result`'s outputs, store each saved gradient at ("saved", name).

        `result` is what a call returned (a TensorDict, or the dict of the tensor call); it is
        updated in place and returned, without the `_grad_delta` entries. A site the backward
        never reached has a zero gradient.
        """
        if isinstance(result, TensorDictBase):
            deltas = {name: result.get((GRAD_DELTA, name), None) for name in self.grad_names}
        else:
            deltas = dict(result.get(GRAD_DELTA, {}))
        if not self.grad_names or any(d is None for d in deltas.values()) or len(deltas) < len(self.grad_names):
            raise BindingError(
                "this result holds no gradient inputs: "
                + ("the program saves no gradient (save grad SITE)" if not self.grad_names else "the call ran without gradients")
                + "\n  hint: call the module with gradients enabled, call .backward() on a value computed from its "
                "outputs, then read_grads"
            )
        if all(d.grad is None for d in deltas.values()):
            raise BindingError(
                "no gradient has reached the saved-gradient sites yet\n"
                "  hint: call .backward() on a value computed from this call's outputs first"
            )
        grads = {name: d.grad if d.grad is not None else torch.zeros_like(d) for name, d in deltas.items()}
        if isinstance(result, TensorDictBase):
            for name, grad in grads.items():
                result.set((SAVED, name), grad)
            result.del_(GRAD_DELTA)
        else:
            result.pop(GRAD_DELTA)
            result.setdefault(SAVED, {}).update(grads)
        return result

    def _grad_deltas(self, inputs, runtime) -> list[torch.Tensor]:
        """One zero input per saved gradient, shaped like its site (a 0-dim zero that needs no
        gradient when gradients are off). Shapes are worked out once per input shapes, except
        those a runtime index (`save grad h[:, $pos]`) decides."""
        if not self.grad_names:
            return []
        sites = [self._grad_sites[name] for name in self.grad_names]
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        if not torch.is_grad_enabled():
            return [torch.zeros((), dtype=i.site.dtype, device=device) for i in sites]
        key = tuple(tuple(x.shape) for x in inputs)
        known = self._delta_shapes.get(key)
        if known is None:
            shapes = site_shapes(self.capture.graph_module, tuple(inputs))
            known = [
                (shapes[i.site.name], None if has_runtime_values(i.index) else region_shape(shapes[i.site.name], i.index, {}))
                for i in sites
            ]
            self._delta_shapes.put(key, known)
        values = dict(zip(self.runtime_names, runtime))
        return [
            torch.zeros(
                shape if shape is not None else region_shape(site_shape, i.index, values),
                dtype=i.site.dtype, device=device, requires_grad=True,
            )
            for i, (site_shape, shape) in zip(sites, known)
        ]


def _variant_key(model: nn.Module, captured: Capture, inputs: tuple) -> tuple:
    """A variant's cache key: the model's state and the inputs' (as the capture cache keys them)."""
    return captured.plan.in_keys, captured.plan.out_keys, captured.frontend, state_key(model, inputs)


def runtime_value(name: str, value):
    """`value` for `$name`: a function as it is, anything else as a tensor that holds data.

    Raises `BindingError` naming the value where it is neither (a str, None, 2**70, a meta tensor).
    """
    if callable(value) and not isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise BindingError(
                f"${name} cannot be {reprlib.repr(value)} (of type {type(value).__name__}): {error}\n"
                "  hint: a runtime value is a tensor, a number (or a nested list of them) that torch "
                "can hold, or a function"
            ) from None
    if value.is_meta:
        raise BindingError(
            f"${name} is a meta tensor of shape {tuple(value.shape)}: it has a shape but no values\n"
            "  hint: pass a tensor with data, on the device the model runs on"
        )
    return value


def _get(td: TensorDictBase, key, what: str) -> torch.Tensor:
    value = td.get(key, None)
    if value is None:
        raise BindingError(
            f"the input TensorDict has no {what} at key {key!r}; its keys: "
            f"{sorted(map(str, td.keys(include_nested=True, leaves_only=True)))}"
        )
    return value


def _unknown_name(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"the program's runtime values: {', '.join('$' + k for k in known) or 'none'}"
    return f"the program has no runtime value ${name}\n  hint: {hint}"


