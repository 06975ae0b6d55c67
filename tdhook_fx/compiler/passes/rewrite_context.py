"""The state one rewrite shares between its passes: the graph and where each site's value is now."""

from __future__ import annotations

import operator
from contextlib import contextmanager

import torch
from torch import fx

from tdhook_fx.compiler.capture import Capture
from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import readable
from tdhook_fx.compiler.ir import Intervention, ResolvedProgram, has_runtime_values, substitute
from tdhook_fx.compiler.passes import ops
from tdhook_fx.syntax import ast

_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class RewriteContext:
    """A copy of the captured graph being rewritten, statement by statement, in program order.

    `current[site]` is the node that holds the site's value after the statements so far; a
    pass that changes a value inserts its nodes right after it and moves every later use of
    the site onto the new node (`replace`).
    """

    def __init__(self, capture: Capture, resolved: ResolvedProgram):
        self.capture = capture
        self.resolved = resolved
        self.graph = fx.Graph()
        self.graph.output(self.graph.graph_copy(capture.graph_module.graph, {}))
        self.original = set(self.graph.nodes)  # the model's own nodes (the rest are the passes')
        self.current: dict[str, fx.Node] = {n.args[1]: n for n in self.graph.nodes if is_tap(n)}
        self.inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.runtime: dict[str, fx.Node] = {}
        for name in resolved.runtime_names:
            self.runtime[name] = self.add_input(name)
        self.saved: dict[str, fx.Node] = {}
        self.pinned: set[fx.Node] = set()  # nodes that read a value as it was (saves): never rewired
        self.attributes: dict[str, torch.Tensor] = {}  # new get_attr targets (masks)
        self.source_inputs: dict[str, list[fx.Node]] = {}  # patch source -> its input placeholders
        self.source_values: dict[str, dict[str, fx.Node]] = {}  # patch source -> site -> node
        self.source_nodes: set[fx.Node] = set()  # the source runs' nodes (never intervened on)
        self.stopped = False

    # ---- graph building -----------------------------------------------------------------------

    def add_input(self, name: str) -> fx.Node:
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):
            return self.graph.placeholder(readable(name))

    def unused_name(self, name: str) -> str:
        """`name`, or `name_2`, `name_3` ... for a new attribute (mask, gradient rule) of the graph."""
        candidate, number = name, 1
        while candidate in self.attributes or any(n.name == candidate for n in self.graph.nodes):
            number += 1
            candidate = f"{name}_{number}"
        return candidate

    @contextmanager
    def after_value(self, site: str):
        """Insert new nodes, in order, right after the site's current value (and its saves).

        Saves of the value sit right after it; new nodes go after them, so a statement may use
        a value saved from the same site (`save x as a; set x = @a`).
        """
        point = self.current[site].next
        while point in self.pinned:
            point = point.next
        with self.graph.inserting_before(point):
            yield

    def call(self, target, *args, name: str | None = None) -> fx.Node:
        return self.graph.create_node("call_function", target, args, {}, name=readable(name) if name else None)

    def method(self, method: str, *args, name: str | None = None) -> fx.Node:
        return self.graph.create_node("call_method", method, args, {}, name=readable(name) if name else None)

    def region(self, value: fx.Node, index: tuple, name: str | None = None, where: tuple = ()) -> fx.Node:
        """`value[index]`; an index holding runtime values (`$pos`) reads them as tensors (`ops.region`),
        so that torch.compile does not recompile for every new position. `where`: see `where`."""
        if not any(isinstance(b, fx.Node) for item in index for b in _parts(item)):
            return self.call(operator.getitem, value, index, name=name)
        return self.call(ops.region, value, index, *where, name=name)

    @staticmethod
    def where(intervention: Intervention) -> tuple:
        """The extra argument of the index ops (`ops.region`, `ops.assign`, ...) that names the
        statement in their errors, where a runtime value in the index can be wrong at call time."""
        return (intervention.describe(),) if has_runtime_values(intervention.index) else ()

    def replace(self, site: str, new: fx.Node, created: set[fx.Node]) -> None:
        """Make `new` the site's value for everything downstream (except the nodes just made)."""
        old = self.current[site]
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in created and user not in self.pinned)
        self.current[site] = new

    def new_nodes(self):
        """A recorder of the nodes made inside a `with` block: `with ctx.new_nodes() as made:`."""
        return _NewNodes(self.graph)

    # ---- values -------------------------------------------------------------------------------

    def value(self, expr, region: fx.Node | None, intervention: Intervention):
        """Nodes computing `expr` at a site whose (indexed) value is `region`."""
        result = self._expr(expr, region)
        if _has_runtime_value(expr):
            site = intervention.site.name
            result = self.call(ops.fit, result, region, intervention.describe(), site, name=f"fit_{site}")
        return result

    def _expr(self, expr, region):
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Var):
            return self.runtime[expr.name]
        if isinstance(expr, ast.Saved):
            return self.saved[expr.name]
        if isinstance(expr, ast.Zeros):
            return self.call(torch.zeros_like, region)
        if isinstance(expr, ast.Mean):
            return self.call(ops.batch_mean, region)
        if isinstance(expr, ast.SiteValue):
            return region
        if isinstance(expr, ast.Call):
            arguments = [self._expr(a, region) for a in expr.args]
            return self.call(ops.call, self.runtime[expr.function.name], *arguments, name=expr.function.name)
        if isinstance(expr, ast.Neg):
            operand = self._expr(expr.operand, region)
            return -operand if isinstance(operand, (int, float)) else self.call(operator.neg, operand)
        left, right = self._expr(expr.left, region), self._expr(expr.right, region)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            return _BINARY[expr.op](left, right)
        return self.call(_BINARY[expr.op], left, right)

    def index(self, index) -> tuple | None:
        """A resolved tensor index with runtime values replaced by their input nodes."""
        return substitute(index, self.runtime.__getitem__)


def _parts(item) -> tuple:
    return (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)


def _has_runtime_value(expr) -> bool:
    if isinstance(expr, (ast.Var, ast.Call)):
        return True
    if isinstance(expr, ast.Neg):
        return _has_runtime_value(expr.operand)
    if isinstance(expr, ast.BinOp):
        return _has_runtime_value(expr.left) or _has_runtime_value(expr.right)
    return False


class _NewNodes:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.nodes: set[fx.Node] = set()

    def __enter__(self):
        self._before = set(self.graph.nodes)
        return self.nodes

    def __exit__(self, *exc):
        self.nodes.update(n for n in self.graph.nodes if n not in self._before)
        return False
