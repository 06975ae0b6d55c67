"""save grad SITE[INDEX] [as NAME] and set grad SITE[INDEX] = EXPR: gradients as graph rewrites.

Both stay inside the graph, so a backward through the compiled module (also under
`torch.compile`, without graph breaks) sees them; neither registers a hook.

- `save grad`: the site's value becomes `value + delta`, where `delta` is a new graph input
  (`grad_<name>`, zeros shaped like the site, requiring grad). Then d(target)/d(delta) is
  exactly d(target)/d(value): after a backward the gradient is `delta.grad` (or
  `torch.autograd.grad(target, delta)`). A zero input is a plain add, which torch.compile,
  torch.export and every autograd engine handle natively; a custom backward that stored the
  gradient would need a side effect inside backward, which torch.compile cannot trace.
  `CompiledModule` creates the deltas (0-dim zeros when gradients are off, so the add
  disappears) and reads them back (`CompiledModule.read_grads`).
- `set grad`: an identity whose backward returns EXPR evaluated on the incoming gradient
  (`ops.OverrideGrad`, a `torch.autograd.Function`; the rule is a small module of the graph
  module, so the printed code reads `ops.override_grad(h_0, self.set_grad_h_0, alpha)`).
  Runtime values and saved activations the expression uses are inputs of that node.

Order: tensor hooks registered on one tensor run in registration order, so consecutive grad
statements at one site (with nothing but plain saves between them) see the gradient in program
order: the first statement's node is the outermost (nearest the site's users, reached first by
the backward), and each later one is inserted innermost, right after the value they share. A
statement that changes the forward value (set, steer, patch) starts a new chain, as a hook on
the new tensor would.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from tdhook_fx.compiler.graphs import readable
from tdhook_fx.compiler.ir import Intervention, substitute
from tdhook_fx.compiler.passes import ops
from tdhook_fx.compiler.passes.meta import GRAD_CHAIN, GRAD_DELTA
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.compiler.shapes import indexed_shape
from tdhook_fx.errors import BindingError
from tdhook_fx.syntax import ast

_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


# ---- the passes -------------------------------------------------------------------------------


def insert_save_grad(ctx: RewriteContext, intervention: Intervention) -> None:
    name = intervention.name
    delta = ctx.add_input(f"grad_{name}")
    delta.meta[GRAD_DELTA] = name
    index = ctx.index(intervention.index)

    def build(value: fx.Node) -> fx.Node:
        if index is None:
            return ctx.call(ops.receive_grad, value, delta, name=f"receive_grad_{name}")
        return ctx.call(ops.receive_grad_at, value, index, delta, *ctx.where(intervention), name=f"receive_grad_{name}")

    _insert_in_chain(ctx, intervention.site.name, build, operands=[])


def insert_set_grad(ctx: RewriteContext, intervention: Intervention) -> None:
    statement: ast.Set = intervention.statement
    site = intervention.site.name
    names = _operand_names(statement.value, intervention.index)
    operands = [ctx.runtime[n[1:]] if n.startswith("$") else ctx.saved[n[1:]] for n in names]
    rule = compile_rule(statement.value, intervention.index, names, intervention.describe(), site)
    module_name = ctx.unused_name(readable(f"set_grad_{site}"))
    ctx.attributes[module_name] = GradOverride(rule, copy=ctx.capture.mutates, statement=intervention.describe())

    def build(value: fx.Node) -> fx.Node:
        override = ctx.graph.get_attr(module_name)
        return ctx.call(ops.override_grad, value, override, *operands, name=f"grad_set_{site}")

    _insert_in_chain(ctx, site, build, operands)


def move_grad_inputs_last(graph: fx.Graph) -> tuple[str, ...]:
    """Put the `save grad` inputs after every other graph input; returns their names in order."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    deltas = [n for n in placeholders if GRAD_DELTA in n.meta]
    others = [n for n in placeholders if GRAD_DELTA not in n.meta]
    last = others[-1]
    for delta in deltas:
        last.append(delta)
        last = delta
    return tuple(n.meta[GRAD_DELTA] for n in deltas)


# ---- chains of grad statements at one site ----------------------------------------------------


def _insert_in_chain(ctx: RewriteContext, site: str, build, operands: list) -> None:
    """Insert `build(value)` so the backward reaches it after the site's earlier grad statements."""
    current = ctx.current[site]
    innermost = None
    value = current
    while value.meta.get(GRAD_CHAIN) == site:
        innermost, value = value, value.args[0]
    order = {node: i for i, node in enumerate(ctx.graph.nodes)}
    if innermost is None:
        # right after the value and after the operands (a save of this site may follow it)
        latest = max([current, *(o for o in operands if isinstance(o, fx.Node))], key=order.__getitem__)
        with ctx.graph.inserting_before(latest.next), ctx.new_nodes() as made:
            new = build(current)
        new.meta[GRAD_CHAIN] = site
        ctx.replace(site, new, made)
        return
    with ctx.graph.inserting_before(innermost):
        for position, operand in enumerate(list(operands)):
            operands[position] = _available_before(ctx, operand, innermost, order, site)
        new = build(value)
    new.meta[GRAD_CHAIN] = site
    innermost.update_arg(0, new)


def _available_before(ctx: RewriteContext, node, point: fx.Node, order: dict, site: str):
    """`node`'s forward value computed before `point` (saves may read a chain's nodes: identities)."""
    if not isinstance(node, fx.Node) or order[node] < order[point]:
        return node
    if node.meta.get(GRAD_CHAIN) == site:
        return _available_before(ctx, node.args[0], point, order, site)
    copy = ctx.graph.node_copy(node, lambda n: _available_before(ctx, n, point, order, site))
    order[copy] = order[point] - 0.5
    ctx.pinned.add(copy)
    return copy


# ---- set grad: an identity with a custom backward ---------------------------------------------


class GradOverride(nn.Module):
    """What `set grad` stores in the graph module: the rule (new gradient from the incoming one).

    The graph calls `ops.override_grad(value, self.set_grad_<site>, *operands)`. `copy`: the
    value passes as a copy (the graph changes tensors in place further on, which autograd
    forbids on a custom function's view output).
    """

    def __init__(self, rule, copy: bool, statement: str):
        super().__init__()
        self.rule = rule
        self.copy = copy
        self.statement = statement

    def extra_repr(self) -> str:
        return self.statement


def compile_rule(expr, index, names: list[str], statement: str, site: str):
    """A function `(grad, *operands) -> new grad` for `set grad SITE[index] = expr`.

    `names` name the operands: `$x` (runtime values) and `@x` (saved activations). Inside
    `expr`, `value` is the incoming gradient (its indexed part), `zeros` and `mean` are shaped
    like it. Compiled to closures once, so torch.compile traces the backward as plain code.
    """
    evaluate = _compile(expr)

    def rule(grad: torch.Tensor, *operands) -> torch.Tensor:
        env = dict(zip(names, operands))
        concrete = substitute(index, lambda name: env["$" + name])
        region = grad if concrete is None else ops.region(grad, concrete, statement)  # a `$pos` stays a tensor
        new = evaluate(region, env)
        if isinstance(new, torch.Tensor):
            new = ops.fit(new, region, statement, f"the gradient at {site}")
        new_region = ops.filled(region, new)
        return new_region if concrete is None else ops.assign(grad, concrete, new_region, statement)

    return rule


def _compile(expr):
    if isinstance(expr, ast.Number):
        number = expr.value
        return lambda region, env: number
    if isinstance(expr, ast.Var):
        key = "$" + expr.name
        return lambda region, env: env[key]
    if isinstance(expr, ast.Saved):
        key = "@" + expr.name
        return lambda region, env: env[key]
    if isinstance(expr, ast.Zeros):
        return lambda region, env: torch.zeros_like(region)
    if isinstance(expr, ast.Mean):
        return lambda region, env: region.mean(0, keepdim=True)
    if isinstance(expr, ast.SiteValue):
        return lambda region, env: region
    if isinstance(expr, ast.Call):
        key = "$" + expr.function.name
        arguments = [_compile(a) for a in expr.args]
        return lambda region, env: ops.call(env[key], *(a(region, env) for a in arguments))
    if isinstance(expr, ast.Neg):
        operand = _compile(expr.operand)
        return lambda region, env: -operand(region, env)
    left, right, op = _compile(expr.left), _compile(expr.right), _BINARY[expr.op]
    return lambda region, env: op(left(region, env), right(region, env))


def _operand_names(expr, index) -> list[str]:
    """`$name` and `@name` that a set grad statement reads, in order, without repeats."""
    found: dict[str, None] = {}

    def walk(node):
        if isinstance(node, ast.Var):
            found["$" + node.name] = None
        elif isinstance(node, ast.Saved):
            found["@" + node.name] = None
        elif isinstance(node, ast.Node):
            for field in node.__dataclass_fields__:
                walk(getattr(node, field))
        elif isinstance(node, (tuple, list)):
            for item in node:
                walk(item)
        elif isinstance(node, slice):
            walk([node.start, node.stop, node.step])

    walk(expr)
    walk(list(index or ()))
    return list(found)



# ---- at call time: the shapes of the deltas ---------------------------------------------------


def site_shapes(graph_module: fx.GraphModule, inputs: tuple) -> dict[str, torch.Size]:
    """The shape of every site of a captured (tapped) graph when it runs on `inputs`.

    Worked out with fake tensors (no computation); a graph fake tensors cannot run (data-
    dependent shapes, a bound function that leaves torch) is run for real once instead.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tdhook_fx.compiler.capture.sites import _record_taps

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            values = _record_taps(graph_module, fakes)
            return {name: torch.Size(value.shape) for name, value in values.items()}
    except Exception:  # noqa: BLE001 - any failure of fake tensors: a real run works or raises the model's error
        values = _record_taps(graph_module, inputs)
        return {name: value.shape for name, value in values.items()}


def region_shape(shape: torch.Size, index, runtime: dict) -> torch.Size:
    """The shape of `value[index]` for a site of `shape` (runtime values in `index` filled in)."""
    if index is None:
        return torch.Size(shape)
    concrete = substitute(index, runtime.__getitem__)
    try:
        return indexed_shape(shape, concrete)
    except (IndexError, RuntimeError) as error:
        raise BindingError(f"the index {index} does not fit a value of shape {tuple(shape)}: {error}") from None
