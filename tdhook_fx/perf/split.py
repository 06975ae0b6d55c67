"""Cut a captured graph at sites: what comes before a site runs once, what follows it runs per value.

`cut(graph_module, sites)` returns a `Cut` of the captured (tapped) graph:

- `prefix(*inputs)` runs the unmodified model only as far as the cut needs and returns
  `(value of each site..., frontier values...)`;
- `suffixes[site](site_value, *frontier)` returns the model outputs, computed from a given value
  of the site; `frontier[site]` says which prefix outputs it takes (the residual stream's other
  branches, masks, sizes: everything the rest of the model reads that the site does not change);
- `values_only(*inputs)` returns only the sites' values (for a patch source: nothing else).

So a sweep over many values of one site pays for the model up to the site once. Two ways to
cut, chosen per graph:

- a graph without in-place ops (every exported graph, most traced ones): the suffix holds only
  the nodes that depend on the site; everything else is computed once, in the prefix;
- a graph with in-place ops keeps its order: the suffix holds every node after the site, and the
  prefix returns copies of the frontier values as they are when the site is computed (an
  in-place op later in the prefix cannot change them). A suffix may still change its frontier
  inputs in place: `Cut.mutates` tells the caller to pass fresh copies each time.

Taps are removed from the pieces; the captured graph is left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from tdhook_fx.compiler.capture.taps import is_tap
from tdhook_fx.compiler.graphs import mutates, needed_nodes
from tdhook_fx.errors import TdhookFxError


@dataclass(frozen=True)
class Cut:
    """A captured graph cut at `sites` (see the module docstring)."""

    sites: tuple[str, ...]
    prefix: fx.GraphModule  # (*inputs) -> (site values..., frontier values...)
    values_only: fx.GraphModule  # (*inputs) -> (site values...)
    suffixes: dict[str, fx.GraphModule]  # site -> (site_value, *frontier) -> model outputs
    frontier: dict[str, tuple[int, ...]]  # site -> indices into prefix outputs
    mutates: bool  # the suffixes may change their inputs in place: pass copies

    def frontier_values(self, site: str, prefix_outputs: Sequence) -> list:
        return [prefix_outputs[i] for i in self.frontier[site]]


def cut(graph_module: fx.GraphModule, sites: Sequence[str]) -> Cut:
    """Cut the tapped `graph_module` (a `Capture.graph_module`) at each of `sites`."""
    graph = graph_module.graph
    taps = {node.args[1]: node for node in graph.nodes if is_tap(node)}
    unknown = [s for s in sites if s not in taps]
    if unknown:
        raise TdhookFxError(
            f"cannot cut the graph at {', '.join(unknown)}: no such activation site in the captured graph\n"
            "  hint: list the sites with tdhook_fx.sites(model, example=...)"
        )
    in_place = any(mutates(node, graph_module) for node in graph.nodes)
    order = {node: i for i, node in enumerate(graph.nodes)}
    output = next(n for n in graph.nodes if n.op == "output")
    rest = {site: _rest_of_model(taps[site], output, order, in_place) for site in sites}
    frontiers = {site: _frontier(taps[site], rest[site], output, order) for site in sites}

    wanted: list = []  # prefix outputs: taps and frontier nodes of the captured graph ((site, node) if copied)
    snapshots: dict[fx.Node, list[fx.Node]] = {}  # in-place graphs: tap -> values copied there
    for site in sites:
        wanted.append((site, taps[site]) if in_place else taps[site])
    frontier_positions: dict[str, tuple[int, ...]] = {}
    for site in sites:
        positions = []
        for node in frontiers[site]:
            key = (site, node) if in_place else node
            if key not in wanted:
                wanted.append(key)
            positions.append(wanted.index(key))
        frontier_positions[site] = tuple(positions)
        if in_place:
            snapshots[taps[site]] = [taps[site], *frontiers[site]]

    prefix = _prefix(graph_module, wanted, snapshots, in_place, order)
    values_only = _prefix(
        graph_module, wanted[: len(sites)], {taps[s]: [taps[s]] for s in sites} if in_place else {}, in_place, order
    )
    suffixes = {
        site: _suffix(graph_module, taps[site], rest[site], frontiers[site], output, in_place) for site in sites
    }
    return Cut(tuple(sites), prefix, values_only, suffixes, frontier_positions, in_place)


# ---- which nodes go where ------------------------------------------------------------------------


def _rest_of_model(tap: fx.Node, output: fx.Node, order: dict, in_place: bool) -> set[fx.Node]:
    """The nodes a suffix recomputes for each value of the site (never the output node)."""
    if in_place:
        return {n for n in order if order[n] > order[tap] and n.op not in ("output", "placeholder")}
    downstream: set[fx.Node] = set()
    stack = list(tap.users)
    while stack:
        node = stack.pop()
        if node in downstream or node is output:
            continue
        downstream.add(node)
        stack.extend(node.users)
    return downstream


def _frontier(tap: fx.Node, rest: set[fx.Node], output: fx.Node, order: dict) -> list[fx.Node]:
    """What the suffix reads from before the cut (parameters excepted: the suffix fetches those)."""
    found: dict[fx.Node, None] = {}
    for node in sorted(rest, key=order.__getitem__) + [output]:
        for used in node.all_input_nodes:
            if used not in rest and used is not tap and used.op != "get_attr":
                found[used] = None
    return list(found)


# ---- building the pieces -------------------------------------------------------------------------


def _prefix(graph_module, wanted: list, snapshots: dict, in_place: bool, order: dict) -> fx.GraphModule:
    """The model's nodes that `wanted` needs, in their order, with taps replaced by their inputs.

    A `wanted` entry is a node, or (site, node) in an in-place graph: the node's value copied
    right where the site's tap is (the site's own value included: a later in-place op may
    change it). An in-place graph keeps every node up to the last tap it needs (an in-place op
    may matter without being an ancestor of anything wanted).
    """
    graph = graph_module.graph
    targets = [w[1] if isinstance(w, tuple) else w for w in wanted]
    last = max(list(snapshots) + [t for t in targets if is_tap(t)], key=order.__getitem__) if in_place else None
    needed = needed_nodes(graph, targets, up_to=last)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    copied: dict[tuple[str, fx.Node], fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = new.placeholder(node.name)
            continue
        if node not in needed:
            continue
        if is_tap(node):
            env[node] = _untap(new, env[node.args[0]], in_place)
            for frontier_node in snapshots.get(node, ()):
                copied[(node.args[1], frontier_node)] = new.call_function(_snapshot, (env[frontier_node],))
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
    outputs = [copied[w] if isinstance(w, tuple) else env[w] for w in wanted]
    new.output(tuple(outputs))
    return _module(graph_module, new)


def _suffix(graph_module, tap: fx.Node, rest: set, frontier: list, output: fx.Node, in_place: bool) -> fx.GraphModule:
    graph = graph_module.graph
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {tap: new.placeholder("site_value")}
    for i, node in enumerate(frontier):
        env[node] = new.placeholder(f"frontier_{i}_{node.name}")
    for node in graph.nodes:
        if node in env:
            continue
        if node.op == "get_attr" and any(user in rest for user in node.users):
            env[node] = new.node_copy(node)
        elif node in rest:
            env[node] = _untap(new, env[node.args[0]], in_place) if is_tap(node) else new.node_copy(node, lambda n: env[n])
    new.output(fx.map_arg(output.args[0], lambda n: env[n]))
    return _module(graph_module, new)


def _untap(graph: fx.Graph, value: fx.Node, in_place: bool) -> fx.Node:
    """A tap's replacement: its input, or (in an in-place graph) a copy, as the tap made."""
    return graph.call_function(torch.clone, (value,)) if in_place else value


def _module(graph_module: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op in ("placeholder", "output") or mutates(n, graph_module)
    )
    graph.lint()
    return fx.GraphModule(graph_module, graph, class_name="Cut")


def _snapshot(value):
    """A tensor's value as it is now (other values, e.g. sizes, are already fixed)."""
    return value.clone() if isinstance(value, torch.Tensor) else value

