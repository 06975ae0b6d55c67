"""The oracle: the same program semantics, done with plain forward hooks on the eager model.

Independent of the compiler by construction: it walks the module tree with Python indexing,
applies each statement inside forward (pre-)hooks in program order, computes pruning masks
with `torch.nn.utils.prune`, and runs patch sources as separate forwards. Tests compare
`tdhook_fx.compile(...)` against `run(...)`; users can do the same in their own suites.

Semantics shared with the compiler (the contract both implement):
- a site's value is a module's output (`:out`, `:out.N`) or input (`:in.N`, `:in.NAME`) on
  its N-th call (`@N`, default the first);
- statements at one site apply in program order; `save` records the value at that point;
- runtime values (`$name`) are cast to the site's dtype; `zeros`/`mean` are shaped like the
  (indexed) site value, `mean` averaging over the batch;
- a bound function (`$f(...)`, `patch ... with $f`) gets copies of its tensor arguments: what
  it changes in place changes nothing else;
- `patch` takes the value the site has when the unmodified model runs on the source inputs;
- `prune` masks a parameter only inside its owning module's forward; `set`/`steer` on a parameter
  edit it there too (in program order with the masks), never the model's own weight;
- `stop` ends the forward right after the site; then only saved values are returned;
- a site inside a module (`M:NAME`, kind "op") is reached by intercepting the torch functions
  the module's own code calls (`torch.overrides.TorchFunctionMode`, calls inside child modules
  left alone): `add_N` ... the N-th call of an arithmetic function (`add`, `sub`, `mul`, `div`,
  `matmul`, `neg`, `softmax`, `relu`, `gelu`, `tanh`: `x + y` counts as `add`), and, on a model
  with eager attention, `q`/`k` (the first `matmul`'s operands, `k` untransposed), `scores` and
  `pattern` (the softmax's input and output) and `v` (the second `matmul`'s right operand); a
  fused `scaled_dot_product_attention` call whose sites a program touches is done step by step
  here (q @ k^T * scale, masks as eager attention's, softmax, dropout, @ v);
- `save grad` records the gradient that reaches the site's value, `set grad` replaces it, each
  with `Tensor.register_hook` on that value (a fresh alias per site, so a module input's hook
  sees only the module's own uses); hooks on one value run in program order.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from tensordict import TensorDictBase
from torch import nn
from torch.overrides import TorchFunctionMode

from tdhook_fx.compiler.capture.call_plan import key_name, plan_call
from tdhook_fx.compiler.resolve import DEFAULT_PATCH_SOURCE
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import parse


def _written(statement, value: torch.Tensor, index, operand) -> torch.Tensor:
    """`value` after a `set` (or `steer` with its operator) of `operand` at `index` (all of it
    when None); a copy when indexed, the model's tensor itself is never written."""
    region = value if index is None else value[index]
    if isinstance(operand, torch.Tensor):
        operand = operand.to(value.dtype)
    if isinstance(statement, ast.Set):
        new_region = torch.empty_like(region).copy_(torch.as_tensor(operand, dtype=value.dtype))
    else:
        new_region = {"+=": region + operand, "-=": region - operand, "*=": region * operand}[statement.op]
    return _placed(value, index, new_region)


def _placed(value: torch.Tensor, index, region: torch.Tensor) -> torch.Tensor:
    """`value` with `region` at `index` (a copy), or `region` itself when index is None."""
    if index is None:
        return region
    new = value.clone()
    new[index] = region
    return new


class _Stopped(Exception):
    pass


def run(
    model: nn.Module, program, inputs, *, in_keys=None, out_keys=None, values=None, sources=None, backward=None
) -> dict:
    """Run `program` on `model` with hooks; returns {out_key: tensor, ("saved", name): tensor}.

    `inputs`: a TensorDict (runtime values and patch sources read from it as the compiled
    module reads them) or a tuple of input tensors. `values`: runtime values by name (they
    override the TensorDict's). `sources`: {source: tuple of input tensors} for patches.

    `backward`: a function of that result returning a scalar. Given, the forward runs with
    gradients and the scalar is differentiated: the result also holds each `save grad`
    gradient at ("saved", name), the gradient of every floating-point input at
    ("grad", in_key) and of every parameter at ("param_grad", name) (zeros where none flows).
    """
    in_keys = list(in_keys or ["input"])
    out_keys = list(out_keys or ["output"])
    program = parse(program) if isinstance(program, str) else program
    values = dict(values or {})
    sources = dict(sources or {})
    if isinstance(inputs, TensorDictBase):
        td = inputs
        inputs = tuple(td.get(k) for k in in_keys)
        for name in ast.variables(program):
            if name not in values and td.get(name, None) is not None:
                values[name] = td.get(name)
        for statement in program.statements:
            if isinstance(statement, ast.Patch):
                source = statement.source or DEFAULT_PATCH_SOURCE
                sources.setdefault(source, tuple(td.get((source, k)) for k in in_keys))
    inputs = tuple(inputs)
    plan, _ = plan_call(model, in_keys, out_keys, inputs)
    hooked = _HookedProgram(model, program, values)
    hooked.grad = backward is not None  # patch sources too: their run is part of what is differentiated
    for source, source_inputs in sources.items():
        hooked.patch_values[source] = hooked.record_patch_sites(plan, source, tuple(source_inputs))
    if backward is None:
        return hooked.run(plan, inputs)
    return _run_backward(hooked, plan, inputs, backward)


def _run_backward(hooked: _HookedProgram, plan, inputs: tuple, backward) -> dict:
    inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)
    result = hooked.run(plan, inputs)
    recorder = hooked.last
    parameters = dict(hooked.model.named_parameters())
    floats = [(key_name(k), x) for k, x in zip(plan.in_keys, inputs) if x.is_floating_point()]
    wanted = [x for _, x in floats] + list(parameters.values()) + recorder.receivers
    loss = backward(result)
    loss = torch.as_tensor(loss)
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
    for (key, _), grad in zip(floats, grads):
        result[("grad", key)] = grad
    for name, grad in zip(parameters, grads[len(floats) :]):
        result[("param_grad", name)] = grad
    for name, like in recorder.grad_shapes.items():
        recorded = recorder.grads.get(name)
        result[("saved", name)] = recorded if recorded is not None else torch.zeros_like(like)
    return result


class _HookedProgram:
    def __init__(self, model: nn.Module, program: ast.Program, values: dict):
        self.model = model
        self.program = program
        self.values = {k: v if callable(v) else torch.as_tensor(v) for k, v in values.items()}
        self.modules = dict(model.named_modules())
        self.names = {m: n for n, m in model.named_modules()}
        self.patch_values: dict[str, dict] = {}
        self.grad = False  # run the forward with gradients (for a backward afterwards)
        self.last: _Recorder | None = None

    # ---- which module a path names ------------------------------------------------------------

    def modules_for(self, path) -> list[tuple[str, ast.Index | None]]:
        if isinstance(path, ast.RegexPath):
            return [(n, None) for n in self.modules if n and re.search(path.pattern, n)]
        current = [(self.model, None)]
        for position, segment in enumerate(path.segments):
            last = position == len(path.segments) - 1
            following = []
            for module, _ in current:
                if isinstance(segment, ast.Attr):
                    following.append((getattr(module, segment.name), None))
                elif isinstance(segment, ast.AnyAttr):
                    following.extend((child, None) for child in module.children())
                elif isinstance(segment, ast.AttrSet):
                    following.extend((getattr(module, n), None) for n in segment.names)
                elif isinstance(module, (nn.ModuleList, nn.Sequential)):
                    following.extend((child, None) for child in _pick(module, segment.entries[0]))
                else:
                    assert last, "a tensor index ends a site"
                    following.append((module, segment))
            current = following
        return [(self.names[m], index) for m, index in current]

    # ---- hooks ----------------------------------------------------------------------------------

    def plan_hooks(self, statements) -> dict:
        """(module name, call, kind) -> [(statement, port item, tensor index)] in program order."""
        plan = defaultdict(list)
        for statement in statements:
            if isinstance(statement, ast.Prune) or self.edited_parameters(statement):
                continue
            site = statement.site
            kind = site.port.kind if site.port else "out"
            item = site.port.item if site.port else None
            for module, path_index in self.modules_for(site.path):
                index = path_index if path_index is not None else site.index
                plan[(module, site.call or 0, kind)].append((statement, item, index))
        return plan

    def edited_parameters(self, statement) -> list[str]:
        """The parameters a `set`/`steer` statement edits (empty where its site is an activation)."""
        if not isinstance(statement, (ast.Set, ast.Steer)) or getattr(statement, "grad", False):
            return []
        site = statement.site
        if site.port is not None or site.call is not None or isinstance(site.path, ast.RegexPath):
            return []
        segments = site.path.segments
        if site.index is None and len(segments) > 1 and isinstance(segments[-1], ast.Index):
            segments = segments[:-1]
        if not isinstance(segments[-1], ast.Attr):
            return []
        owners = self.modules_for(ast.Path(segments[:-1])) if len(segments) > 1 else [("", None)]
        names = [f"{o}.{segments[-1].name}" if o else segments[-1].name for o, _ in owners]
        parameters = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        return names if names and all(n in parameters for n in names) else []

    def record_patch_sites(self, plan, source: str, inputs) -> dict:
        wanted = [s for s in self.program.statements if isinstance(s, ast.Patch) and (s.source or DEFAULT_PATCH_SOURCE) == source]
        hooks = self.plan_hooks([ast.Save(s.site, None) for s in wanted])
        recorder = _Recorder(self, hooks, record_only=True)
        recorder.forward(plan, inputs)
        return recorder.saved

    def run(self, plan, inputs) -> dict:
        hooks = self.plan_hooks(self.program.statements)
        recorder = self.last = _Recorder(self, hooks, record_only=False)
        edits = [s for s in self.program.statements if isinstance(s, ast.Prune) or self.edited_parameters(s)]
        with _pruned(self, edits, recorder._eval):
            outputs = recorder.forward(plan, inputs)
        result = {} if recorder.stopped else dict(zip(map(key_name, plan.out_keys), outputs))
        for name, value in recorder.saved.items():
            result[("saved", name)] = value
        return result


class _Recorder:
    """One forward with hooks that apply (or, for patch sources, only record) statements."""

    def __init__(self, hooked: _HookedProgram, hooks: dict, record_only: bool):
        self.applying = 0  # > 0 while a statement runs (its torch calls are not the model's)
        self.hooked = hooked
        self.hooks = hooks
        self.record_only = record_only
        self.saved: dict = {}
        self.calls: dict[str, int] = defaultdict(int)
        self.stopped = False
        self.grads: dict = {}  # save grad: name -> the gradient the hook saw
        self.grad_shapes: dict = {}  # save grad: name -> a tensor shaped like it (zeros if none flows)
        self.receivers: list[torch.Tensor] = []  # grad sites whose value needs no gradient: new leaves
        self.grad_alias: dict[str, torch.Tensor] = {}  # site -> the alias its grad hooks are on

    def forward(self, plan, inputs):
        handles = []
        wanted = {module for module, _, _ in self.hooks}
        self.running: list[nn.Module] = []  # the module calls in progress, innermost last
        self.inside: list[_Inside] = []  # the internal-site interceptors entered, innermost last
        if any(kind == "op" for _, _, kind in self.hooks):
            # only the model's own modules: an nn.Module that forward calls but the model does not
            # hold (transformers 5.25 wraps Llama's `apply_rotary_pos_emb` in one, with `kernels`)
            # is code of its caller, as in the graph, where it has no sites of its own
            tree = {id(m) for m in self.hooked.model.modules()}
            handles.append(nn.modules.module.register_module_forward_pre_hook(
                lambda m, a: self.running.append(m) if id(m) in tree else None))
            handles.append(nn.modules.module.register_module_forward_hook(
                lambda m, a, o: self.running.pop() and None if id(m) in tree else None))
        for name in wanted:
            module = self.hooked.modules[name]
            handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))
        try:
            with torch.set_grad_enabled(self.hooked.grad):
                return plan.call(self.hooked.model, inputs)
        except _Stopped:
            self.stopped = True
            return None
        finally:
            for handle in handles:
                handle.remove()
            while self.inside:  # a stop inside a module leaves its interceptor entered
                self.inside.pop().__exit__(None, None, None)

    def _pre(self, name):
        def hook(module, args, kwargs):
            call = self.calls[name]
            self.calls[name] += 1
            statements = self.hooks.get((name, call, "in"), [])
            result = self._inputs(module, name, call, statements, args, kwargs) if statements else None
            inside = self.hooks.get((name, call, "op"), [])
            if inside:  # entered after the input statements: their own torch calls are not the module's
                label = name + (f"@{call}" if call else "")
                self.inside.append(_Inside(self, module, label, inside).__enter__())
            return result

        return hook

    def _inputs(self, module, name, call, statements, args, kwargs):
        """The module call's arguments with the statements at its input ports applied."""
        label = name + (f"@{call}" if call else "")
        args, kwargs = list(args), dict(kwargs)
        names = _parameter_names(module)
        tensors = [(("args", i), names[i] if i < len(names) else i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensors += [(("kwargs", k), k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        for statement, item, index in statements:
            if item is None:
                chosen = tensors if isinstance(statement, ast.Save) and len(tensors) > 1 else tensors[:1]
            elif isinstance(item, int):
                chosen = [tensors[item]]
            else:
                chosen = [t for t in tensors if t[1] == item]
            for (where, key), port in chosen:
                container = args if where == "args" else kwargs
                site = f"{label}:in.{port}"
                container[key] = self.apply(statement, container[key], index, site)
        return tuple(args), kwargs

    def _post(self, name):
        def hook(module, args, kwargs, output):
            call = self.calls[name] - 1
            if self.hooks.get((name, call, "op")):
                self.inside.pop().__exit__(None, None, None)
            statements = self.hooks.get((name, call, "out"), [])
            label = name + (f"@{call}" if call else "")
            for statement, item, index in statements:
                if isinstance(output, torch.Tensor) and item is None:
                    output = self.apply(statement, output, index, label)
                    continue
                elements = output if isinstance(output, dict) else dict(enumerate(output))
                keys = [item] if item is not None else [k for k, v in elements.items() if isinstance(v, torch.Tensor)]
                if item is None and not isinstance(statement, ast.Save):
                    keys = keys[:1]
                replaced = dict(elements)
                for key in keys:
                    replaced[key] = self.apply(statement, elements[key], index, f"{label}:out.{key}")
                output = _rebuild(output, replaced)
            return output

        return hook

    # ---- one statement on one value -------------------------------------------------------------

    def apply(self, statement, value: torch.Tensor, index, site: str) -> torch.Tensor:
        # The statement's own torch calls are not the model's: an enclosing module's interceptor
        # (a forward hook runs after its module has left `running`) must not count them.
        self.applying += 1
        try:
            return self._apply_statement(statement, value, index, site)
        finally:
            self.applying -= 1

    def _apply_statement(self, statement, value: torch.Tensor, index, site: str) -> torch.Tensor:
        if self.record_only:  # a patch source run: remember the site's whole value
            self.saved[site] = value.clone()
            return value
        index = self._index(index)
        if getattr(statement, "grad", False):
            return self.hook_grad(statement, value, index, site)
        if isinstance(statement, ast.Save):
            name = statement.name or site
            self.saved[name] = (value if index is None else value[index]).clone()
            return value
        if isinstance(statement, ast.Stop):
            raise _Stopped
        region = value if index is None else value[index]
        if isinstance(statement, ast.Patch):
            source = statement.source or DEFAULT_PATCH_SOURCE
            patched = self.hooked.patch_values[source][site]
            new_region = patched if index is None else patched[index]
            if statement.function is not None:
                new_region = self.hooked.values[statement.function.name](*_copies(region, new_region))
            return _placed(value, index, new_region.to(value.dtype))
        return _written(statement, value, index, self._eval(statement.value, region))

    def hook_grad(self, statement, value: torch.Tensor, index, site: str) -> torch.Tensor:
        """`save grad` / `set grad`: a hook on the site's alias (made on the first grad statement)."""
        alias = self.grad_alias.get(site)
        if alias is not value:
            if value.requires_grad:
                alias = value.clone()
            else:  # nothing upstream needs a gradient: a zero leaf of its own receives it
                receiver = torch.zeros_like(value, requires_grad=True)  # (the alias itself is no leaf,
                alias = value + receiver  # so in-place ops downstream, `ReLU(inplace=True)`, work)
                self.receivers.append(receiver)
            self.grad_alias[site] = alias
        if isinstance(statement, ast.Save):
            name = statement.name or f"{site}.grad"
            self.grad_shapes[name] = alias if index is None else alias[index]

            def record(grad):
                self.grads[name] = (grad if index is None else grad[index]).clone()

            alias.register_hook(record)
        else:
            alias.register_hook(lambda grad: self._new_grad(statement, grad, index))
        return alias

    def _new_grad(self, statement, grad: torch.Tensor, index) -> torch.Tensor:
        region = grad if index is None else grad[index]
        operand = self._eval(statement.value, region)
        if isinstance(operand, torch.Tensor):
            operand = operand.to(grad.dtype)
        new_region = torch.empty_like(region).copy_(torch.as_tensor(operand, dtype=grad.dtype))
        if index is None:
            return new_region
        new = grad.clone()
        new[index] = new_region
        return new

    def _index(self, index):
        if index is None:
            return None
        items = []
        for entry in index.entries:
            if isinstance(entry, ast.IntEntry):
                items.append(entry.value)
            elif isinstance(entry, ast.Var):
                items.append(self.hooked.values[entry.name])
            elif isinstance(entry, ast.EllipsisEntry):
                items.append(...)
            else:
                bound = [self.hooked.values[b.name] if isinstance(b, ast.Var) else b for b in (entry.start, entry.stop, entry.step)]
                items.append(slice(*bound))
        return tuple(items)

    def _eval(self, expr, region):
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Var):
            return self.hooked.values[expr.name]
        if isinstance(expr, ast.Saved):
            return self.saved[expr.name]
        if isinstance(expr, ast.Zeros):
            return torch.zeros_like(region)
        if isinstance(expr, ast.Mean):
            return region.mean(dim=0, keepdim=True)
        if isinstance(expr, ast.SiteValue):
            return region
        if isinstance(expr, ast.Call):
            return self.hooked.values[expr.function.name](*_copies(*(self._eval(a, region) for a in expr.args)))
        if isinstance(expr, ast.Neg):
            return -self._eval(expr.operand, region)
        left, right = self._eval(expr.left, region), self._eval(expr.right, region)
        return {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right, "/": lambda: left / right}[expr.op]()


_ATTENTION = ("q", "k", "v", "scores", "pattern")
# Torch functions by the name their operation has in a captured graph (`x + y` is `add`).
_OPERATIONS = {
    "add": "add", "__add__": "add", "__radd__": "add",
    "sub": "sub", "__sub__": "sub", "__rsub__": "sub",
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul",
    "div": "div", "__truediv__": "div", "__rtruediv__": "div",
    "matmul": "matmul", "__matmul__": "matmul",
    "neg": "neg", "__neg__": "neg",
    "softmax": "softmax", "relu": "relu", "gelu": "gelu", "tanh": "tanh",
}


class _Inside(TorchFunctionMode):
    """Applies the statements at sites inside one module call to the torch functions its own
    code calls (see the module docstring for the names)."""

    def __init__(self, recorder: _Recorder, module: nn.Module, label: str, statements: list):
        super().__init__()
        self.recorder = recorder
        self.module = module
        self.label = label
        self.statements = statements
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        own = bool(self.recorder.running) and self.recorder.running[-1] is self.module and not self.recorder.applying
        if own and func is F.scaled_dot_product_attention and any(i in _ATTENTION for _, i, _ in self.statements):
            return self._attention(*args, **kwargs)
        operation = _OPERATIONS.get(getattr(func, "__name__", ""))
        if operation is None or not own:
            return func(*args, **kwargs)
        number = self.counts[operation]
        self.counts[operation] += 1
        args = list(args)
        if operation == "matmul" and number == 0:
            args[0] = self._apply("q", args[0])
            args[1] = self._apply("k", args[1].transpose(-1, -2)).transpose(-1, -2) if self._wants("k") else args[1]
        elif operation == "matmul" and number == 1:
            args[1] = self._apply("v", args[1])
        elif operation == "softmax":
            args[0] = self._apply("scores", args[0])
        result = func(*args, **kwargs)
        if operation == "softmax":
            result = self._apply("pattern", result)
        return self._apply(f"{operation}_{number}", result)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """A fused attention call done step by step, as eager attention does it (see the module
        docstring), when a statement touches its scores or pattern; with q, k or v alone the fused
        call itself runs on the changed inputs (as the compiled graph keeps it)."""
        if enable_gqa and (self._wants("k") or self._wants("v") or self._wants("scores") or self._wants("pattern")):
            key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
            value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
            enable_gqa = False
        q, k, v = self._apply("q", query), self._apply("k", key), self._apply("v", value)
        if not (self._wants("scores") or self._wants("pattern")):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
            )
        scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.size(-1) ** -0.5)
        lowest = torch.finfo(scores.dtype).min
        if is_causal:
            scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), lowest)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        elif attn_mask is not None:
            scores = scores + attn_mask
        scores = self._apply("scores", scores)
        pattern = self._apply("pattern", F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return F.dropout(pattern, dropout_p) @ v if dropout_p else pattern @ v

    def _wants(self, name: str) -> bool:
        return any(item == name for _, item, _ in self.statements)

    def _apply(self, name: str, value):
        for statement, item, index in self.statements:
            if item == name:
                value = self.recorder.apply(statement, value, index, f"{self.label}:{name}")
        return value


def _copies(*arguments) -> tuple:
    """A bound function's arguments: its own copy of each tensor (what it changes in place stays its own)."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in arguments)


def _pick(container, entry) -> list[nn.Module]:
    children = list(container.children())
    if isinstance(entry, ast.IntEntry):
        return [children[entry.value]]
    if isinstance(entry, ast.AllEntry):
        return children
    if isinstance(entry, ast.SetEntry):
        return [children[v] for v in entry.values]
    return children[entry.start : entry.stop : entry.step]


def _parameter_names(module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _rebuild(output, replaced: dict):
    if isinstance(output, dict):
        for key, value in replaced.items():
            output[key] = value
        return output
    return type(output)(replaced[i] for i in range(len(output)))


class _pruned:
    """Prune with `torch.nn.utils.prune`'s own masks, and edit parameters (`set`/`steer`), only inside
    the owner's forward: the owner sees `edit(original)`, the edits composed in program order."""

    def __init__(self, hooked: _HookedProgram, statements, evaluate):
        self.hooked = hooked
        self.statements = statements
        self.evaluate = evaluate  # a value expression at a region (the recorder's)
        self.handles = []
        self.originals: dict[tuple[nn.Module, str], torch.Tensor] = {}
        self.orders: dict[nn.Module, list[str]] = {}  # each swapped module's parameter names, in order

    def __enter__(self):
        edits: dict[tuple[str, str], list] = defaultdict(list)  # (owner, attribute) -> functions, in order
        for statement in self.statements:
            if isinstance(statement, ast.Prune):
                for name in self._parameters(statement.param):
                    owner_name, _, attribute = name.rpartition(".")
                    weight = getattr(self.hooked.modules[owner_name], attribute).detach()
                    mask = self._mask(statement, weight)
                    edits[(owner_name, attribute)].append(lambda w, mask=mask: w * mask)
                continue
            for name in self.hooked.edited_parameters(statement):
                owner_name, _, attribute = name.rpartition(".")
                edits[(owner_name, attribute)].append(lambda w, s=statement: self._edit(s, w))
        for (owner_name, attribute), functions in edits.items():
            owner = self.hooked.modules[owner_name]
            self.handles.append(owner.register_forward_pre_hook(self._swap(attribute, functions)))
            self.handles.append(owner.register_forward_hook(self._restore(attribute)))
        return self

    def _edit(self, statement, weight: torch.Tensor) -> torch.Tensor:
        """`set`/`steer` on a weight, on a copy (the whole weight, or its indexed part)."""
        index = statement.site.index
        segments = statement.site.path.segments
        if index is None and isinstance(segments[-1], ast.Index):
            index = segments[-1]
        index = None if index is None else self.hooked.last._index(index)
        region = weight if index is None else weight[index]
        return _written(statement, weight, index, self.evaluate(statement.value, region))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for (owner, attribute) in list(self.originals):
            self._put_back(owner, attribute)
        return False

    def _swap(self, attribute: str, functions: list):
        def hook(module, args):
            if not any(owner is module for owner, _ in self.originals):  # its own order, before any swap
                self.orders[module] = list(module._parameters)
            original = module._parameters.pop(attribute)
            self.originals[(module, attribute)] = original
            edited = original
            for function in functions:
                edited = function(edited)
            setattr(module, attribute, edited)

        return hook

    def _restore(self, attribute: str):
        def hook(module, args, output):
            self._put_back(module, attribute)

        return hook

    def _put_back(self, module: nn.Module, attribute: str) -> None:
        """The parameter back in its place: the model's parameter order (named_parameters,
        state_dict, a later capture's graph) must not change."""
        original = self.originals.pop((module, attribute))
        delattr(module, attribute)
        parameters = module._parameters
        parameters[attribute] = original
        position = {name: i for i, name in enumerate(self.orders.get(module, ()))}
        reordered = sorted(parameters.items(), key=lambda item: position.get(item[0], len(position)))
        parameters.clear()
        parameters.update(reordered)

    def _parameters(self, param) -> list[str]:
        names = [n for n, _ in self.hooked.model.named_parameters(remove_duplicate=False)]
        if isinstance(param, ast.RegexPath):
            return [n for n in names if re.search(param.pattern, n)]
        *owner_path, last = param.segments
        owners = self.hooked.modules_for(ast.Path(tuple(owner_path))) if owner_path else [("", None)]
        return [f"{o}.{last.name}" if o else last.name for o, _ in owners]

    def _mask(self, statement: ast.Prune, weight: torch.Tensor) -> torch.Tensor:
        amount = statement.amount.value / 100 if statement.amount.percent else statement.amount.value
        criterion, dim = statement.criterion, statement.dim
        if isinstance(criterion, ast.Random):
            with torch.random.fork_rng():
                if criterion.seed is not None:
                    torch.manual_seed(criterion.seed)
                method = torch_prune.RandomUnstructured(amount) if dim is None else torch_prune.RandomStructured(amount, dim)
                return method.compute_mask(weight, torch.ones_like(weight))
        scores = self.hooked.values[criterion.var.name] if isinstance(criterion, ast.Importance) else weight
        method = torch_prune.L1Unstructured(amount) if dim is None else torch_prune.LnStructured(amount, 2, dim)
        return method.compute_mask(scores, torch.ones_like(weight)).to(weight.dtype)
