"""Pictures of the rewritten graph: valid SVG/HTML/DOT naming the inserted nodes, collapsed by module."""

import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.shipping import draw

STEER = "save transformer.h[*].mlp\nsteer transformer.h[1].mlp += $alpha * $v\nprune transformer.h[0].mlp.c_fc.weight 50%"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def gpt2_steered(built_in):
    sample = built_in["gpt2"]()
    return tdhook_fx.compile(
        sample.model, STEER, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )


def box_labels(svg_root) -> dict[str, str]:
    """box id -> its first text line, for every box drawn."""
    labels = {}
    for group in svg_root.iter(f"{SVG}g"):
        texts = [t.text for t in group.iter(f"{SVG}text")]
        labels[group.get("id")] = (texts[0] if texts else "", group.get("class"))
    return labels


def test_inserted_nodes_are_exactly_what_the_program_added(gpt2_steered):
    inserted = draw.inserted_nodes(gpt2_steered)
    assert inserted == {
        "alpha", "v", "mul", "fit_transformer_h_1_mlp", "steer_transformer_h_1_mlp",
        "prune_mask_transformer_h_0_mlp_c_fc_weight", "pruned_transformer_h_0_mlp_c_fc_weight",
    }


def test_svg_is_valid_and_highlights_the_inserted_nodes(gpt2_steered, tmp_path):
    path = gpt2_steered.draw(tmp_path / "gpt2.svg", engine="python")
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    labels = box_labels(root)
    inserted = {label for label, kind in labels.values() if kind == "inserted"}
    assert {"fit_transformer_h_1_mlp", "steer_transformer_h_1_mlp", "prune_mask_transformer_h_0_mlp_c_fc_weight"} <= inserted
    saved = {label for label, kind in labels.values() if kind == "saved"}
    assert saved == {f"saved transformer.h.{i}.mlp" for i in range(4)}
    modules = [label for label, kind in labels.values() if kind == "module"]
    assert "transformer.h.1" in modules and "transformer.h.1 (cont.)" in modules  # the steer sits inside block 1


def test_html_is_well_formed_and_lists_every_operation(gpt2_steered, tmp_path):
    path = gpt2_steered.draw(tmp_path / "gpt2.html", depth=2, engine="python")
    text = path.read_text()
    checker = _TagBalance()
    checker.feed(text)
    assert checker.stack == [] and checker.errors == []
    assert text.count("<svg") >= 1 and "steer_transformer_h_1_mlp" in text
    assert '<li class="inserted"><code>fit_transformer_h_1_mlp</code>: fit</li>' in text
    assert "one module level deeper" in text


def test_dot_text_names_the_nodes(gpt2_steered, tmp_path):
    text = gpt2_steered.draw(tmp_path / "gpt2.dot").read_text()
    assert text.startswith("digraph rewritten {") and text.rstrip().endswith("}")
    assert '"steer_transformer_h_1_mlp\\nadd"' in text and "->" in text


def test_every_depth_keeps_every_operation_exactly_once(gpt2_steered):
    graph = draw.node_graph(gpt2_steered)
    for depth in (1, 2, 3, None):
        boxes = draw.collapse(graph, depth, gpt2_steered.sites.modules)
        members = [m for b in boxes for m in boxes.nodes[b]["box"].members]
        assert sorted(members) == sorted(graph.nodes)
    full = draw.collapse(graph, None)
    assert len(full) == len(graph)


def test_a_saved_copy_and_its_output_are_two_boxes():
    """fx-traced models that change tensors in place get a `saved_NAME` clone and a `saved NAME` output."""
    from tests import zoo

    sample = zoo.cnn()
    cm = tdhook_fx.compile(sample.model, "save 3\nsteer 4 *= $scale\nprune 0.weight 30%", example=sample.example)
    graph = draw.node_graph(cm)
    boxes = draw.collapse(graph, None)
    assert len(boxes) == len(graph)
    labels = [boxes.nodes[b]["box"].label for b in boxes]
    assert "saved_3" in labels and "saved 3" in labels


def test_a_patch_source_run_is_collapsed_like_the_model(built_in):
    sample = built_in["gpt2"]()
    cm = tdhook_fx.compile(sample.model, "patch transformer.h[1].mlp", example=sample.example,
                           in_keys=sample.in_keys, out_keys=sample.out_keys)
    graph = draw.node_graph(cm)
    boxes = draw.collapse(graph, draw.auto_depth(graph, cm.sites.modules), cm.sites.modules)
    kinds = [boxes.nodes[b]["box"].kind for b in boxes]
    assert "source" in kinds and kinds.count("inserted") < 6


def test_mlp_all_nodes_and_errors(tmp_path):
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "steer 2 += $v", example=sample.example)
    root = ET.parse(cm.draw(tmp_path / "mlp.svg", depth=None, engine="python")).getroot()
    labels = {label for label, _ in box_labels(root).values()}
    assert {"_0", "_1", "_2", "steer_2", "fit_2", "v", "input_1"} <= labels
    with pytest.raises(tdhook_fx.ExportError, match=r"name it \*.svg, \*.html or \*.dot"):
        cm.draw(tmp_path / "mlp.png")
    if shutil.which("dot") is None:
        with pytest.raises(tdhook_fx.ExportError, match=r"needs Graphviz's `dot` program"):
            cm.draw(tmp_path / "mlp.svg", engine="graphviz")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graphviz_renders_when_installed(gpt2_steered, tmp_path):
    root = ET.parse(gpt2_steered.draw(tmp_path / "dot.svg", engine="graphviz")).getroot()
    assert "steer_transformer_h_1_mlp" in ET.tostring(root, encoding="unicode")


@pytest.mark.slow
def test_a_12_layer_gpt2_collapses_to_one_box_per_block(tmp_path):
    sample = builtin_zoo.gpt2(n_layer=12, n_embd=32, n_head=2)
    cm = tdhook_fx.compile(sample.model, "save transformer.h[*].mlp\nsteer transformer.h[5].mlp += $v",
                           example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    root = ET.parse(cm.draw(tmp_path / "gpt2_12.svg", engine="python")).getroot()
    labels = box_labels(root).values()
    modules = [label for label, kind in labels if kind == "module"]
    assert len(modules) <= draw.MAX_BOXES
    assert all(f"transformer.h.{i}" in modules for i in range(12))
    assert not any(label.startswith("transformer.h.0.") for label in modules)
    assert sum(kind == "saved" for _, kind in labels) == 12


class _TagBalance(HTMLParser):
    """Checks that every opened element (but the void ones) is closed, in order."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr", "path", "rect", "marker"})

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
