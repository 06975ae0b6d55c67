"""CompiledModule: the rewritten graph behind a TensorDict (or plain tensor) interface."""

from __future__ import annotations

import difflib
import reprlib

import torch
from tensordict import TensorDictBase
from torch import nn

from tdhook_fx.compiler.capture import Capture, SiteTable, join_keys, key_name
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.graphs import fetch_attr
from tdhook_fx.compiler.ir import ResolvedProgram, has_runtime_values
from tdhook_fx.compiler.passes.grad import region_shape, site_shapes
from tdhook_fx.compiler.passes.rewrite import Rewritten
from tdhook_fx.compiler.runner import runner
from tdhook_fx.errors import BindingError, ExportError, TdhookFxError
from tdhook_fx.syntax.ast import variables

SAVED = "saved"
GRAD_DELTA = "_grad_delta"  # the zero inputs whose gradients `save grad` returns (see read_grads)


class CompiledModule(nn.Module):
    """A model with a program compiled into its graph: no hooks, printable, exportable.

    Call it with a TensorDict (model inputs at `in_keys`, runtime values `$name` at key
    `name`, patch sources at `(source, in_key)`): it writes the model outputs at `out_keys`
    and every saved value at `("saved", name)` into that TensorDict and returns it. Or call it
    with the input tensors (runtime values and patch sources as keywords): it returns a dict
    `{out_key: tensor, ..., "saved": {name: tensor}}`.

    Gradients (`save grad`): with gradients enabled, a call also puts one zero tensor per saved
    gradient at `("_grad_delta", name)` (or `result["_grad_delta"][name]`); after a backward
    through the outputs, `cm.read_grads(td)` moves their gradients to `("saved", name)`.

    What was compiled, for reading (tools such as `tdhook_fx.shipping` use only these):
    `program` (canonical text), `resolved` (the `ResolvedProgram`; `print(cm.resolved)` lists
    each statement's sites), `code`, `graph`, `graph_module`, `sites` (the `SiteTable`),
    `frontend`, `in_keys`, `out_keys` (none after a `stop`), `captured_out_keys`, `runtime_names`,
    `saved_names`, `grad_names`, `patch_inputs` (the graph's inputs after the runtime values),
    `base_model`, `example_inputs`, `example(...)`, `graph_tensors()` and `bound_values()`.
    """

    def __init__(self, capture: Capture, sites: SiteTable, resolved: ResolvedProgram, rewritten: Rewritten, training: bool):
        super().__init__()
        self.graph_module = rewritten.graph_module
        self.sites = sites
        self.resolved = resolved
        self.frontend = capture.frontend
        self.capture_seconds = capture.seconds
        self.in_keys = list(capture.plan.in_keys)
        self.out_keys = list(capture.plan.out_keys) if rewritten.returns_model_outputs else []
        self._rewritten = rewritten
        self._captured_training = training
        self.capture = capture  # the captured graph this module was rewritten from (cached per model)
        self.example_inputs: tuple[torch.Tensor, ...] | None = None  # the example compiled on (save/export)
        self._bound: dict[str, str] = {}  # runtime name -> buffer name
        self._functions: dict[str, object] = {}  # runtime name -> bound Python function
        self._grad_sites = {i.name: i for i in resolved.interventions if i.kind == "save_grad"}
        self._delta_shapes: dict[tuple, list] = {}  # input shapes -> (site shape, delta shape or None) per saved grad
        self.train(training)

    # ---- what was compiled --------------------------------------------------------------------

    @property
    def program(self) -> str:
        """The program, in canonical DSL text."""
        return str(self.resolved.program)

    @property
    def code(self) -> str:
        """The rewritten forward, as Python."""
        return self.graph_module.code

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
        if self.training != self._captured_training:
            mode = "training" if self._captured_training else "eval"
            raise TdhookFxError(
                f"this module was compiled with the model in {mode} mode and is now in the other mode; "
                "the graph baked the mode in (dropout, batch norm)\n"
                f"  hint: call .{'train' if self._captured_training else 'eval'}() on it, or compile again "
                "after switching the model's mode"
            )
        if self.grad_names:
            return self._call_making_grad_inputs(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], TensorDictBase):
            return self._call_tensordict(args[0])
        return self._call_tensors(args, kwargs)

    @torch.compiler.disable(recursive=False)
    def _call_making_grad_inputs(self, args, kwargs):
        """The call of a program with `save grad`, which makes its zero gradient inputs here.

        torch.compile cannot make tensors that require gradients inside a graph, so under
        `torch.compile(cm)` this wrapper runs eagerly and only the rewritten graph it calls is
        compiled: one graph, no break.
        """
        return self._call(args, kwargs)

    def _call_tensordict(self, td: TensorDictBase) -> TensorDictBase:
        inputs = [_get(td, key, "model input") for key in self.in_keys]
        runtime = [self._runtime(name, td.get(name, None)) for name in self.runtime_names]
        sources = [_get(td, join_keys(source, key), "patch source") for source, key in self.patch_inputs]
        deltas = self._grad_deltas(inputs, runtime)
        outputs = self._run_graph(*inputs, *runtime, *sources, *deltas)
        keys = [*self.out_keys, *((SAVED, name) for name in self.saved_names)]
        if deltas and deltas[0].requires_grad:
            keys, outputs = keys + [(GRAD_DELTA, name) for name in self.grad_names], (*outputs, *deltas)
        for key, value in zip(keys, outputs):
            _check_batch(td, key, value)
            td.set(key, value)
        return td

    def _call_tensors(self, args, kwargs) -> dict:
        if len(args) != len(self.in_keys):
            raise BindingError(
                f"expected {len(self.in_keys)} input tensor(s) ({', '.join(map(key_name, self.in_keys))}), got {len(args)}"
            )
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
        outputs = self._run_graph(*args, *runtime, *sources, *deltas)
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
        compiles the graph alone. Arguments are `torch.compile`'s.
        """
        object.__setattr__(self, "_compiled_graph", torch.compile(self.graph_module, *args, **kwargs))
        return self

    def _run_graph(self, *inputs):
        """The rewritten graph's forward, called directly: going through `nn.Module.__call__` (hook
        dispatch, fx's error-printing wrapper) costs more than a small model's own layers take.
        Nothing hooks the internal graph module, and an error keeps its full traceback.

        Eagerly it runs on `tdhook_fx.compiler.runner`'s copy, with attribute paths resolved once (under
        torch.compile attribute lookups cost nothing, and the copy need not be traced)."""
        compiled = self.__dict__.get("_compiled_graph")
        if compiled is not None:
            return compiled(*inputs)
        if torch.compiler.is_compiling():
            return self.graph_module.forward(*inputs)
        graph = self.__dict__.get("_runner")
        if graph is None:
            graph = runner(self.graph_module)
            object.__setattr__(self, "_runner", graph)  # not a submodule: it holds no state of its own
        return graph.forward(*inputs)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_runner", None)  # `.to()` and friends replace buffers the runner names
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.__dict__.pop("_runner", None)  # assign=True replaces tensors the runner names
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        if key not in self._delta_shapes:
            shapes = site_shapes(self.capture.graph_module, tuple(inputs))
            self._delta_shapes[key] = [
                (shapes[i.site.name], None if has_runtime_values(i.index) else region_shape(shapes[i.site.name], i.index, {}))
                for i in sites
            ]
        values = dict(zip(self.runtime_names, runtime))
        return [
            torch.zeros(
                shape if shape is not None else region_shape(site_shape, i.index, values),
                dtype=i.site.dtype, device=device, requires_grad=True,
            )
            for i, (site_shape, shape) in zip(sites, self._delta_shapes[key])
        ]


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


def _check_batch(td: TensorDictBase, key, value: torch.Tensor) -> None:
    batch = tuple(td.batch_size)
    if tuple(value.shape[: len(batch)]) != batch:
        raise TdhookFxError(
            f"{key!r} has shape {tuple(value.shape)}, which does not start with the TensorDict's "
            f"batch size {list(batch)}, so it cannot be stored in it\n"
            "  hint: call with a TensorDict of batch_size=[] or with plain tensors (cm(*inputs))"
        )


def _unknown_name(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"the program's runtime values: {', '.join('$' + k for k in known) or 'none'}"
    return f"the program has no runtime value ${name}\n  hint: {hint}"


