"""Pictures of a rewritten graph: which nodes the program inserted, and where in the model.

`cm.draw(path)` writes SVG (`.svg`), a page (`.html`: the picture, one level more detail
on demand, and a module tree listing every operation) or Graphviz text (`.dot`). Nodes are
grouped by the module they run in and, by default, collapsed: each run of a module's
operations is one box, at the deepest module level that draws at most about 40 such boxes
(a 12-layer GPT-2 shows one box per block). Nodes the program inserted (steers, sets,
patches, masks, runtime values) are never collapsed and are highlighted; saved values are
drawn as outputs. The layout is Graphviz's `dot` when it is installed, else a layered
layout computed here (pure Python), so no dependency is needed.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
from torch import fx

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.compiler.graphs import natural_order, readable
from tdhook_fx.compiler.passes.meta import INSERTED, SITE
from tdhook_fx.errors import ExportError

MAX_BOXES = 40
FORMATS = (".svg", ".html", ".dot")
ENGINES = ("auto", "graphviz", "python")
_COLORS = {  # fill, stroke
    "inserted": ("#ffe08a", "#d48806"),
    "saved": ("#d9f7be", "#389e0d"),
    "module": ("#e6f0ff", "#5b7db1"),
    "source": ("#fff1e0", "#d4a259"),
    "op": ("#f5f8ff", "#8ea4c8"),
    "input": ("#f0f0f0", "#8c8c8c"),
    "output": ("#f0f0f0", "#8c8c8c"),
}


# ---- which nodes the program inserted -------------------------------------------------------------


def inserted_nodes(cm) -> set[str]:
    """Names of the nodes of `cm.graph` that the program added or changed (not the model's own)."""
    return {n.name for n in cm.graph.nodes if n.meta.get(INSERTED)}


def site_node_names(cm) -> dict[str, str]:
    """Name of a node that holds a site's value (`transformer_h_2_mlp`) -> the site's module."""
    return {n.name: cm.sites[n.meta[SITE]].module for n in cm.graph.nodes if SITE in n.meta}


# ---- the graph as networkx ------------------------------------------------------------------------


@dataclass
class Box:
    """One drawn box: a collapsed run of a module's operations, or one node."""

    id: str
    label: str
    detail: str
    kind: str  # module, op, inserted, input, output, saved
    members: list[str] = field(default_factory=list)


def node_graph(cm) -> nx.DiGraph:
    """Every node of the rewritten graph (but the model's weights), with its module and role.

    Node attributes: `module` (dotted, "" for the model itself), `kind` (op, inserted, source:
    a patch's source run, input, output, saved), `what` (the operation in words), `order`
    (position in the graph).
    """
    inserted = inserted_nodes(cm)
    sites = site_node_names(cm)
    copies = _source_run(cm)
    graph = nx.DiGraph()
    nodes = list(cm.graph.nodes)
    modules: dict[str, str] = {}
    for order, node in enumerate(nodes):
        if node.op == "output" or _is_weight(node, inserted) or _plumbing(node):
            continue
        kind = "source" if node.name in copies else "inserted" if node.name in inserted else "op"
        kind = "input" if node.op == "placeholder" and kind == "op" else kind
        modules[node.name] = _module(node, inserted - copies, sites, modules)
        graph.add_node(node.name, module=modules[node.name], kind=kind, what=_what(node, cm), order=order)
    for node in nodes:
        if node.name in graph:
            for source in node.all_input_nodes:
                if source.name in graph:
                    graph.add_edge(source.name, node.name)
    output = next(n for n in reversed(nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    names = [*(("output", key_name(k)) for k in cm.out_keys), *(("saved", s) for s in cm.saved_names)]
    for position, ((kind, name), value) in enumerate(zip(names, values)):
        box = f"{kind}:{name}"
        graph.add_node(box, module="", kind=kind, what=f"{kind} {name}", order=len(nodes) + position)
        if isinstance(value, fx.Node) and value.name in graph:
            graph.add_edge(value.name, box)
    return graph


def _source_run(cm) -> set[str]:
    """The copies of model nodes that compute a patch's source run (inserted, but the model's ops)."""
    return {n.name for n in cm.graph.nodes if n.meta.get(INSERTED) == "source" and n.meta.get("nn_module_stack")}


def _is_weight(node: fx.Node, inserted: set[str]) -> bool:
    """A read of the model's parameters or buffers (not drawn; an inserted mask is)."""
    return node.op == "get_attr" and (node.name not in inserted or node.target.startswith("model."))


def _plumbing(node: fx.Node) -> bool:
    """torch.export's input-guard call: not part of the model's computation."""
    return node.op == "call_module" and node.target == "_guards_fn"


def _module(node: fx.Node, inserted: set[str], sites: dict[str, str], known: dict[str, str]) -> str:
    if node.op == "placeholder":
        return ""
    if node.name in inserted:  # the module of the site it acts on: its first model input's
        for source in node.all_input_nodes:
            if source.name in sites:
                return sites[source.name]
            if source.name in known and source.op != "placeholder":
                return known[source.name]
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
    path = re.sub(r"@\d+", "", path)
    if node.op == "call_module":
        path = node.target
    path = path.removeprefix("model").removeprefix(".")
    return "" if path.startswith("_") else path  # export's own bookkeeping, not a module


def _what(node: fx.Node, cm) -> str:
    if node.op == "placeholder":
        if node.name in {readable(n) for n in cm.runtime_names}:
            return f"runtime value ${node.name}"
        return f"input {node.name}"
    if node.op == "get_attr":
        return f"mask {node.target}"
    if node.op == "call_module":
        return type(cm.graph_module.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return re.sub(r"^(aten\.|torch\.ops\.aten\.)", "", str(getattr(target, "_opname", name)))


# ---- collapsing ---------------------------------------------------------------------------------


def collapse(graph: nx.DiGraph, depth: int | None, modules: dict | None = None) -> nx.DiGraph:
    """Boxes: each run of consecutive operations in one module (cut to `depth` levels) is one box.

    `depth=None` keeps every node. Inserted nodes, inputs and outputs stay single boxes; a
    patch's source run (copies of the model's operations) collapses like the model's own.
    """
    boxes = nx.DiGraph()
    owner: dict[str, str] = {}
    current: Box | None = None
    current_key: tuple | None = None
    seen: dict[tuple, int] = {}
    for name in sorted(graph, key=lambda n: graph.nodes[n]["order"]):
        data = graph.nodes[name]
        if data["kind"] not in ("op", "source") or depth is None:
            label = _short_label(name, data)
            box = Box(f"n{data['order']}", label, data["what"], data["kind"], [name])
            boxes.add_node(box.id, box=box, order=data["order"])
            owner[name] = box.id
            current = None
            continue
        group = ".".join(data["module"].split(".")[:depth]) if data["module"] else ""
        kind = "module" if data["kind"] == "op" else "source"
        key = (kind, group)
        if current is None or current_key != key:
            seen[key] = seen.get(key, 0) + 1
            label = ("source run: " if kind == "source" else "") + (group or "(model)")
            label += " (cont.)" if seen[key] > 1 else ""
            kind_name = type(modules.get(group)).__name__ if modules and group in modules else ""
            current = Box(f"{kind[0]}_{readable(group) or 'model'}_{seen[key]}", label, kind_name, kind, [])
            current_key = key
            boxes.add_node(current.id, box=current, order=data["order"])
        current.members.append(name)
        owner[name] = current.id
    for source, target in graph.edges:
        a, b = owner[source], owner[target]
        if a != b:
            boxes.add_edge(a, b)
    for box_id in boxes:
        box = boxes.nodes[box_id]["box"]
        if box.kind in ("module", "source"):
            count = len(box.members)
            box.detail = f"{box.detail + ' · ' if box.detail else ''}{count} op{'s' if count != 1 else ''}"
    return boxes


def auto_depth(graph: nx.DiGraph, modules: dict | None = None, max_boxes: int = MAX_BOXES) -> int:
    """The deepest module level that draws at most `max_boxes` module boxes (at least 1).

    Inserted nodes, inputs and outputs are drawn whatever the depth, so they do not count.
    """
    deepest = max((len(d["module"].split(".")) for _, d in graph.nodes(data=True) if d["module"]), default=1)
    chosen = 1
    for depth in range(1, deepest + 1):
        boxes = collapse(graph, depth, modules)
        if sum(boxes.nodes[b]["box"].kind in ("module", "source") for b in boxes) <= max_boxes:
            chosen = depth
    return chosen


def _short_label(name: str, data: dict) -> str:
    if data["kind"] in ("output", "saved"):
        return data["what"]
    return name


# ---- drawing ------------------------------------------------------------------------------------


def draw(cm, path: str | os.PathLike, *, depth: int | str | None = "auto", engine: str = "auto") -> Path:
    """Write a picture of `cm`'s rewritten graph to `path` (.svg, .html or .dot); returns the path.

    `depth`: "auto" (the default: collapsed to at most ~40 boxes), a module depth (1 groups
    by top-level module), or None (every node). `engine`: "graphviz" (needs the `dot`
    program), "python" (built in) or "auto" (graphviz when installed).
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ExportError(f"cannot draw to {path.name!r}: name it *.svg, *.html or *.dot")
    if engine not in ENGINES:
        raise ExportError(f"unknown drawing engine {engine!r}; choose one of {ENGINES}")
    if engine == "graphviz" and not shutil.which("dot"):
        raise ExportError("engine='graphviz' needs Graphviz's `dot` program on PATH; engine='python' needs nothing")
    graph = node_graph(cm)
    modules = cm.sites.modules
    if depth == "auto":
        depth = auto_depth(graph, modules)
    boxes = collapse(graph, depth, modules)
    use_dot = engine == "graphviz" or (engine == "auto" and shutil.which("dot") is not None)
    title = f"{type(modules.get('')).__name__}: {_one_line(cm.program)}"
    if path.suffix == ".dot":
        text = to_dot(boxes, title)
    elif path.suffix == ".svg":
        text = render_svg(boxes, title, use_dot)
    else:
        deeper = collapse(graph, depth + 1, modules) if isinstance(depth, int) else None
        text = to_html(cm, graph, boxes, deeper, title, use_dot)
    path.write_text(text, encoding="utf-8")
    return path


def render_svg(boxes: nx.DiGraph, title: str, use_dot: bool) -> str:
    if use_dot:
        return _graphviz_svg(to_dot(boxes, title))
    return to_svg(boxes, title)


def to_dot(boxes: nx.DiGraph, title: str) -> str:
    """Graphviz text: the boxes, their edges, the highlight colors."""
    lines = [
        "digraph rewritten {",
        f"  label={_dot_string(title)}; labelloc=t; rankdir=TB; fontname=Helvetica;",
        "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=11];",
    ]
    for box_id in _ordered(boxes):
        box = boxes.nodes[box_id]["box"]
        fill, stroke = _COLORS[box.kind]
        label = _dot_string(f"{box.label}\n{box.detail}" if box.detail else box.label)
        width = ", penwidth=2" if box.kind == "inserted" else ""
        tooltip = _dot_string(", ".join(box.members[:30]))
        lines.append(f"  {box_id} [label={label}, fillcolor=\"{fill}\", color=\"{stroke}\"{width}, tooltip={tooltip}];")
    for source, target in boxes.edges:
        lines.append(f"  {source} -> {target};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _graphviz_svg(dot_text: str) -> str:
    try:
        result = subprocess.run(
            ["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ExportError(f"Graphviz's dot failed: {error}\n  hint: engine='python' draws without it") from None
    if result.returncode != 0:
        raise ExportError(f"Graphviz's dot failed: {result.stderr.strip()}\n  hint: engine='python' draws without it")
    return result.stdout


# ---- the built-in layout (pure Python) -------------------------------------------------------------

_CHAR = 7.2  # px per character at font-size 12 (monospace-ish estimate)
_BOX_H = 38
_GAP_X = 24
_GAP_Y = 34
_MARGIN = 20


def layout(boxes: nx.DiGraph) -> dict[str, tuple[float, float, float]]:
    """Layered positions (x, y, width) per box: each box one layer below its last input.

    Boxes without inputs (inputs, runtime values) sit right above their first user, so a
    steering vector is drawn next to where it acts, not at the top of a 12-block model.
    """
    layer: dict[str, int] = {}
    order = _ordered(boxes)
    for box_id in order:
        preds = list(boxes.predecessors(box_id))
        layer[box_id] = 1 + max((layer[p] for p in preds), default=-1)
    for box_id in order:
        if boxes.in_degree(box_id) == 0 and boxes.out_degree(box_id):
            layer[box_id] = max(0, min(layer[s] for s in boxes.successors(box_id)) - 1)
    rows: dict[int, list[str]] = {}
    for box_id in order:
        rows.setdefault(layer[box_id], []).append(box_id)
    widths = {b: _box_width(boxes.nodes[b]["box"]) for b in boxes}
    row_widths = {r: sum(widths[b] for b in ids) + _GAP_X * (len(ids) - 1) for r, ids in rows.items()}
    total = max(row_widths.values(), default=0)
    positions = {}
    for r, ids in rows.items():
        x = _MARGIN + (total - row_widths[r]) / 2
        for box_id in ids:
            positions[box_id] = (x, _MARGIN + 30 + r * (_BOX_H + _GAP_Y), widths[box_id])
            x += widths[box_id] + _GAP_X
    return positions


def to_svg(boxes: nx.DiGraph, title: str) -> str:
    positions = layout(boxes)
    width = max((x + w for x, _, w in positions.values()), default=200) + _MARGIN
    height = max((y for _, y, _ in positions.values()), default=0) + _BOX_H + _MARGIN
    width = max(width, len(title) * _CHAR + 2 * _MARGIN)
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="12">'
        ),
        (
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#888"/></marker></defs>'
        ),
        f'<text x="{_MARGIN}" y="{_MARGIN + 8}" font-size="13" font-weight="bold">{_xml(title)}</text>',
    ]
    for source, target in boxes.edges:
        x1, y1, w1 = positions[source]
        x2, y2, w2 = positions[target]
        a, b = (x1 + w1 / 2, y1 + _BOX_H), (x2 + w2 / 2, y2)
        bend = max(20.0, (b[1] - a[1]) / 2)
        parts.append(
            f'<path d="M {a[0]:.1f} {a[1]:.1f} C {a[0]:.1f} {a[1] + bend:.1f}, {b[0]:.1f} {b[1] - bend:.1f}, '
            f'{b[0]:.1f} {b[1]:.1f}" fill="none" stroke="#999" stroke-width="1.2" marker-end="url(#arrow)"/>'
        )
    for box_id in _ordered(boxes):
        box = boxes.nodes[box_id]["box"]
        x, y, w = positions[box_id]
        fill, stroke = _COLORS[box.kind]
        stroke_width = 2.2 if box.kind == "inserted" else 1.2
        members = ", ".join(box.members[:30]) + (" ..." if len(box.members) > 30 else "")
        parts.append(f'<g id="{box_id}" class="{box.kind}"><title>{_xml(members)}</title>')
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="6" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{stroke_width}"/>'
        )
        weight = ' font-weight="bold"' if box.kind == "inserted" else ""
        parts.append(f'<text x="{x + 8:.1f}" y="{y + 16:.1f}"{weight}>{_xml(box.label)}</text>')
        if box.detail:
            parts.append(f'<text x="{x + 8:.1f}" y="{y + 30:.1f}" font-size="10" fill="#555">{_xml(box.detail)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _box_width(box: Box) -> float:
    return max(len(box.label) * _CHAR, len(box.detail) * _CHAR * 0.85, 60) + 16


def _ordered(boxes: nx.DiGraph) -> list[str]:
    return sorted(boxes, key=lambda b: boxes.nodes[b]["order"])


# ---- the page ------------------------------------------------------------------------------------

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
pre { background: #f6f6f6; padding: .6em; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 8px; border-radius: 4px; }
details { margin-left: 1.2em; }
summary { cursor: pointer; }
.inserted { background: #ffe08a; font-weight: bold; }
.has-inserted > summary { font-weight: bold; }
code { font-size: 12px; }
.picture { overflow: auto; border: 1px solid #ddd; }
"""


def to_html(cm, graph: nx.DiGraph, boxes: nx.DiGraph, deeper, title: str, use_dot: bool) -> str:
    legend = "".join(
        f'<span style="background:{_COLORS[k][0]};border:1px solid {_COLORS[k][1]}">{k}</span>'
        for k in ("inserted", "saved", "module", "input")
    )
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<pre>{html.escape(cm.program)}</pre>",
        f'<p class="legend">{legend}</p>',
        f'<div class="picture">{render_svg(boxes, title, use_dot)}</div>',
    ]
    if deeper is not None and len(deeper) > len(boxes):
        parts.append(
            f"<details><summary>one module level deeper ({len(deeper)} boxes)</summary>"
            f'<div class="picture">{render_svg(deeper, title, use_dot)}</div></details>'
        )
    parts.append("<h2>Modules</h2>")
    parts.append(_module_tree(graph))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _module_tree(graph: nx.DiGraph) -> str:
    """Nested <details>, one per module, listing its operations; inserted ones highlighted."""
    children: dict[str, set[str]] = {"": set()}
    ops: dict[str, list[str]] = {}
    for name in sorted(graph, key=lambda n: graph.nodes[n]["order"]):
        data = graph.nodes[name]
        module = data["module"]
        ops.setdefault(module, []).append(name)
        parts = module.split(".") if module else []
        for i in range(len(parts)):
            parent, child = ".".join(parts[:i]), ".".join(parts[: i + 1])
            children.setdefault(parent, set()).add(child)
            children.setdefault(child, set())
    inserted_under: dict[str, bool] = {}

    def has_inserted(module: str) -> bool:
        if module not in inserted_under:
            own = any(graph.nodes[n]["kind"] == "inserted" for n in ops.get(module, []))
            inserted_under[module] = own or any(has_inserted(c) for c in children.get(module, ()))
        return inserted_under[module]

    def render(module: str) -> str:
        marked = has_inserted(module)
        items = []
        for name in ops.get(module, []):
            data = graph.nodes[name]
            css = ' class="inserted"' if data["kind"] == "inserted" else ""
            items.append(f"<li{css}><code>{html.escape(name)}</code>: {html.escape(data['what'])}</li>")
        nested = "".join(render(c) for c in sorted(children.get(module, ()), key=natural_order))
        label = html.escape(module or "(model)")
        return (
            f'<details{" open" if marked else ""} class="{"has-inserted" if marked else ""}">'
            f"<summary>{label} ({len(ops.get(module, []))} ops)</summary><ul>{''.join(items)}</ul>{nested}</details>"
        )

    return render("")


def _one_line(program: str) -> str:
    return "; ".join(line.strip() for line in program.splitlines() if line.strip())


def _xml(text: str) -> str:
    return html.escape(text, quote=True)


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
