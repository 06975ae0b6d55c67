"""Readouts: the model's own final computation (e.g. final norm + unembedding) applied to other sites.

The captured graph already holds the computation from the final residual stream to the logits.
`copy_readout` copies those nodes (the model's ops, its weights shared, not copied) onto another
site's value, as a logit lens needs for every layer, inside the one rewritten graph.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import ancestors, readable
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.errors import TdhookFxError


def readout_region(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes that compute `end` from `start` (start excluded, end included), in graph order.

    Every other input of these nodes (weights, constants, sizes) is shared by each copy.
    """
    downstream: set[fx.Node] = set()
    stack = list(start.users)
    while stack:
        node = stack.pop()
        if node not in downstream:
            downstream.add(node)
            stack.extend(node.users)
    if end not in downstream:
        raise TdhookFxError(
            f"the readout ends at {end.name}, which is not computed from {start.meta.get('tdhook_fx_site', start.name)}, "
            "where it starts: there is nothing to copy\n  hint: start at the input of the module that leads to the output"
        )
    needed = ancestors([end]) & downstream
    return [node for node in start.graph.nodes if node in needed]


def copy_readout(ctx: RewriteContext, region: list[fx.Node], start: fx.Node, value: fx.Node, name: str) -> fx.Node:
    """The nodes of `region` copied onto `value` in place of `start`; returns the copy of its last node.

    The copies go right before the graph's output (every shared input is computed by then). Taps
    in the region are skipped: each copy's site is the readout's, not the model's.
    """
    graph = ctx.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    env = {start: value}
    with graph.inserting_before(output):
        for node in region:
            if is_tap(node):
                env[node] = env[node.args[0]]
                continue
            env[node] = graph.node_copy(node, lambda n: env.get(n, n))
    last = env[region[-1]]
    last._rename(readable(name))
    return last


def top_probabilities(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable entries of the last dimension (all of them if it has fewer):
    (softmax probabilities, highest first, and their indices)."""
    probabilities = torch.softmax(logits, -1)
    return torch.topk(probabilities, min(k, probabilities.shape[-1]))


def top_k_nodes(ctx: RewriteContext, logits: fx.Node, k: int, name: str) -> tuple[fx.Node, fx.Node]:
    """Nodes for `top_probabilities(logits, k)`, before the graph's output: (probabilities, indices)."""
    graph = ctx.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        top = ctx.call(top_probabilities, logits, k, name=f"{name}_top")
        return ctx.call(operator.getitem, top, 0, name=f"{name}_probs"), ctx.call(operator.getitem, top, 1, name=f"{name}_tokens")


def stacked(ctx: RewriteContext, values: list[fx.Node], name: str) -> fx.Node:
    """`torch.stack(values)`: one output, the readouts along a new first dimension."""
    graph = ctx.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        return ctx.call(torch.stack, values, name=name)
