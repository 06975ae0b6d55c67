"""Crafted `.pt2` archives: a real `cm.export` archive edited the ways an attacker would.

Each `Crafted` takes a good archive and a marker path and writes a copy whose payload, if
it ever runs, creates the marker. `runs` says when plain `torch.export.load` runs it: at "load",
at "call" (the loaded program's first call), or None where the edit is refused for being
outside what cm.export writes although plain torch would not run anything (a bomb, a spoof, a
broken format). The tests show the "load" and "call" payloads live under plain torch, then that
`tdhook_fx.load_export` refuses every archive with the marker still absent.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.shipping.payloads import Payload, pickled

GRAPH = "models/model.json"
WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
MANIFEST = "extra/tdhook_fx.json"


def read(archive: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """(root folder, [(name inside the root, bytes), ...]) in the archive's order."""
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        root = infos[0].filename.split("/", 1)[0]
        return root, [(info.filename.split("/", 1)[1], z.read(info)) for info in infos]


def write(target: Path, root: str, entries: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> Path:
    """Write entries (duplicates and odd names allowed) under `root`, stored unless told."""
    with zipfile.ZipFile(target, "w", compression) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(f"{root}/{name}"), data, compress_type=compression)
    return target


def edited(
    source: Path, target: Path, *, change: Callable | None = None, add=(), drop=(), rename=None
) -> Path:
    """A copy of `source`: `change(name, data)` per entry, entries renamed, dropped, then added."""
    root, entries = read(source)
    rename = rename or {}
    out = []
    for name, data in entries:
        if name in drop:
            continue
        out.append((rename.get(name, name), change(name, data) if change else data))
    out.extend(add)
    return write(target, root, out)


def entry(archive: Path, name: str) -> bytes:
    return dict(read(archive)[1])[name]


def with_json(name: str, edit: Callable) -> Callable:
    """A `change` that applies `edit(value)` (in place) to the JSON entry `name`."""

    def change(entry_name, data):
        if entry_name != name:
            return data
        value = json.loads(data)
        edit(value)
        return json.dumps(value).encode()

    return change


# ---- payloads -----------------------------------------------------------------------------------


def python_payload(marker: Path) -> str:
    """A Python expression that creates `marker` (and evaluates to 1)."""
    return f"__import__('builtins').exec(\"open({str(marker)!r}, 'w').write('ran')\") or 1"


def quoteless_payload(marker: Path) -> str:
    """`python_payload` without quote characters (guards are pasted into a quoted string)."""
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return f"exec(bytes({list(code.encode())}).decode())"


def pickle_config(path_name: str) -> dict:
    """A weights/constants config entry that makes torch unpickle `path_name`."""
    return {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}


def first_expression(graph: dict, replacement: str) -> None:
    """Replace the graph's first symbolic expression (the dynamic batch size)."""

    def visit(value) -> bool:
        if isinstance(value, dict):
            if "expr_str" in value:
                value["expr_str"] = replacement
                return True
            return any(visit(v) for v in value.values())
        return isinstance(value, list) and any(visit(v) for v in value)

    assert visit(graph), "the graph has no symbolic size"


def evil_graph(good_graph: bytes, marker: Path) -> bytes:
    """The archive's graph with a sympify payload in its first symbolic size."""
    graph = json.loads(good_graph)
    first_expression(graph, python_payload(marker))
    return json.dumps(graph).encode()


# ---- the crafted archives -----------------------------------------------------------------------


@dataclass(frozen=True)
class Crafted:
    name: str
    build: Callable[[Path, Path, Path], Path]  # (good archive, target, marker) -> target
    runs: str | None  # "load", "call" or None (see the module docstring)


def _sample_inputs_case(source, target, marker):
    return edited(
        source, target, drop={SAMPLE_INPUTS}, add=[("data/sample_inputs/model.PT", pickled(marker))]
    )


def _sample_inputs_folder_case(source, target, marker):
    return edited(
        source, target, drop={SAMPLE_INPUTS}, add=[("Data/Sample_Inputs/model.pt", pickled(marker))]
    )


def _sample_inputs_pickle(source, target, marker):
    return edited(source, target, change=lambda n, d: pickled(marker) if n == SAMPLE_INPUTS else d)


def _constant_case(source, target, marker):
    config = with_json(CONSTANTS, lambda c: c["config"].update(evil=pickle_config("tensor_0")))
    return edited(source, target, change=config, add=[("data/constants/TENSOR_0", pickled(marker))])


def _constant_use_pickle(source, target, marker):
    config = with_json(CONSTANTS, lambda c: c["config"].update(evil=pickle_config("tensor_0")))
    return edited(source, target, change=config, add=[("data/constants/tensor_0", pickled(marker))])


def _opaque_object(source, target, marker):
    config = with_json(CONSTANTS, lambda c: c["config"].update(evil=pickle_config("opaque_obj_0")))
    return edited(
        source, target, change=config, add=[("data/constants/opaque_obj_0", pickle.dumps(Payload(marker)))]
    )


def _weight_use_pickle(source, target, marker):
    def edit(config):
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        first["path_name"] = "weight_0"

    return edited(
        source,
        target,
        change=lambda n, d: (
            pickled(marker) if n == "data/weights/weight_0" else with_json(WEIGHTS, edit)(n, d)
        ),
    )


def _second_model(model: str):
    def build(source, target, marker):
        graph = entry(source, GRAPH)
        weights = {"config": {"evil": pickle_config("evil")}}
        return edited(
            source,
            target,
            add=[
                (f"models/{model}.json", graph),
                (f"data/sample_inputs/{model}.pt", b""),
                (f"data/weights/{model}_weights_config.json", json.dumps(weights).encode()),
                (f"data/constants/{model}_constants_config.json", b'{"config": {}}'),
                ("data/weights/evil", pickled(marker)),
            ],
        )

    return build


def _path_name(path_name: str, stored_as: str):
    def build(source, target, marker):
        config = with_json(WEIGHTS, lambda c: c["config"].update(evil=pickle_config(path_name)))
        return edited(source, target, change=config, add=[(stored_as, pickled(marker))])

    return build


def _graph_copy(name: str):
    def build(source, target, marker):
        return edited(source, target, add=[(name, evil_graph(entry(source, GRAPH), marker))])

    return build


def _graph_renamed(name: str):
    def build(source, target, marker):
        return edited(source, target, drop={GRAPH}, add=[(name, evil_graph(entry(source, GRAPH), marker))])

    return build


def example_inputs() -> bytes:
    """Sample inputs torch loads with weights_only=True (no payload): torch builds the guards
    function only for a program that has them. Shaped for the MLP archive of the tests."""
    buffer = io.BytesIO()
    torch.save(((torch.randn(4, 16),), {}), buffer)
    return buffer.getvalue()


def _guards_in_second_graph(source, target, marker):
    graph = json.loads(entry(source, GRAPH))
    graph["guards_code"] = [f"{quoteless_payload(marker)} or 1 == 1"]
    return edited(
        source,
        target,
        change=lambda n, d: example_inputs() if n == SAMPLE_INPUTS else d,
        add=[("models/model.jsox", json.dumps(graph).encode())],
    )


def _legacy(name: str):
    def build(source, target, marker):
        return edited(source, target, add=[(name, pickled(marker))])

    return build


def _duplicate_graph(source, target, marker):
    root, entries = read(source)
    evil = (GRAPH, evil_graph(entry(source, GRAPH), marker))
    return write(target, root, [evil, *entries])  # torch's reader finds the first of the two


def _graph_edit(edit: Callable[[dict, Path], None], with_example_inputs: bool = False):
    def build(source, target, marker):
        graph = with_json(GRAPH, lambda g: edit(g, marker))
        if not with_example_inputs:
            return edited(source, target, change=graph)
        return edited(
            source, target, change=lambda n, d: example_inputs() if n == SAMPLE_INPUTS else graph(n, d)
        )

    return build


def _sympify(graph, marker):
    first_expression(graph, python_payload(marker))


def _guard(graph, marker):
    graph["guards_code"] = [f"{quoteless_payload(marker)} or 1 == 1"]


def _guard_key(graph, marker):
    """A guard made only of allowed shapes whose input key breaks out of the double-quoted
    message torch pastes the guard into (torch._assert(..., "Guard failed: <guard>"))."""
    graph["guards_code"] = [f"True or L['x\"); {quoteless_payload(marker)}; (\"']"]


def _aten_from_file(graph, marker):
    """`aten::from_file(shared=True)` creates and maps a file when the graph runs: "only aten
    operators" is not enough."""
    nodes = graph["graph_module"]["graph"]["nodes"]
    nodes.insert(
        0,
        {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [
                {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2},
            ],
            "outputs": [{"as_tensor": {"name": "mapped"}}],
            "metadata": {},
            "is_hop_single_tensor_return": None,
            "name": "mapped",
        },
    )
    graph["graph_module"]["graph"]["tensor_values"]["mapped"] = {
        "dtype": 1,
        "sizes": [{"as_int": 4}],
        "requires_grad": False,
        "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}],
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }


def _os_system(graph, marker):
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def _extension_operator(graph, marker):
    graph["graph_module"]["graph"]["nodes"][0]["target"] = "#evil:run"


def _source_fn_stack(graph, marker):
    graph["graph_module"]["graph"]["nodes"][0]["metadata"]["source_fn_stack"] = "x,torch.os.system"


def _custom_metadata(graph, marker):
    graph["graph_module"]["metadata"]["custom"] = "{}"


def _custom_object_argument(graph, marker):
    graph["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {
        "as_custom_obj": {"name": "x", "class_fqn": "evil"}
    }


def _power_tower(graph, marker):
    first_expression(
        graph, "Pow(Pow(Pow(Pow(Integer(10), Integer(16)), Integer(16)), Integer(16)), Integer(16))"
    )


def _python_power(graph, marker):
    first_expression(graph, "10**10**8")


def _namedtuple_fields(graph, marker):
    graph["graph_module"]["treespec_namedtuple_fields"] = {"evil": {"field_names": ["a"]}}


def _in_spec(graph, marker):
    call = graph["graph_module"]["module_call_graph"][0]["signature"]
    call["in_spec"] = call["in_spec"].replace("builtins.dict", "collections.OrderedDict")


def _node_name(graph, marker):
    graph["graph_module"]["graph"]["nodes"][0]["name"] = "x = __import__('os')"


def _zero_byte_weight(source, target, marker):
    """A 0-byte weight whose meta claims 384M elements: torch would allocate 1.5 GB of zeros."""

    def edit(config):
        meta = next(iter(config["config"].values()))
        meta["path_name"] = "weight_0"
        meta["tensor_meta"]["sizes"] = [{"as_int": 384 << 20}]
        meta["tensor_meta"]["strides"] = [{"as_int": 1}]

    change = with_json(WEIGHTS, edit)
    return edited(source, target, change=lambda n, d: b"" if n == "data/weights/weight_0" else change(n, d))


def _deflated_graph(source, target, marker, size=1 << 30):
    """The graph padded with spaces to `size` bytes, deflated: a 1 MB archive holding 1 GiB."""
    root, entries = read(source)
    with zipfile.ZipFile(target, "w") as z:
        for name, data in entries:
            if name != GRAPH:
                z.writestr(zipfile.ZipInfo(f"{root}/{name}"), data)
                continue
            info = zipfile.ZipInfo(f"{root}/{name}")
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as stream:
                stream.write(data)
                padding = b" " * (1 << 20)
                for _ in range((size - len(data)) >> 20):
                    stream.write(padding)
    return target


def _deep_graph(source, target, marker):
    return edited(source, target, change=lambda n, d: b"[" * 200_000 + b"]" * 200_000 if n == GRAPH else d)


def _ansi_program(source, target, marker):
    """A comment whose escape sequences erase the line above it on a terminal (hiding the steer)."""

    def edit(manifest):
        manifest["program"] = "save 1\nsteer 2 += 1000\n# \x1b[1A\x1b[2Knothing to see here"

    return edited(source, target, change=with_json(MANIFEST, edit))


def _manifest_edit(edit: Callable[[dict], None]):
    def build(source, target, marker):
        return edited(source, target, change=with_json(MANIFEST, edit))

    return build


def _extra_file(source, target, marker):
    return edited(source, target, add=[("extra/notes.txt", b"hello")])


def _native(source, target, marker):
    return edited(source, target, add=[("data/aotinductor/model/model.so", b"\x7fELF")])


def _outside_root(source, target, marker):
    root, entries = read(source)
    target = write(target, root, entries)
    with zipfile.ZipFile(target, "a") as z:
        z.writestr("elsewhere/models/model.json", evil_graph(entry(source, GRAPH), marker))
    return target


def _compressed(source, target, marker):
    root, entries = read(source)
    return write(target, root, entries, compression=zipfile.ZIP_DEFLATED)


CRAFTED = [
    # entry names, compared the way torch's reader compares them
    Crafted("sample-inputs-upper-case", _sample_inputs_case, "load"),
    Crafted("sample-inputs-folder-case", _sample_inputs_folder_case, "load"),
    Crafted("sample-inputs-pickle", _sample_inputs_pickle, "load"),
    Crafted("constant-upper-case", _constant_case, "load"),
    Crafted("constant-use-pickle", _constant_use_pickle, "load"),
    Crafted("constant-opaque-object", _opaque_object, "load"),
    Crafted("weight-use-pickle", _weight_use_pickle, "load"),
    Crafted("second-model-with-slash", _second_model("a/b"), "load"),
    Crafted("second-model", _second_model("other"), "load"),
    Crafted("absolute-path-name", _path_name("/evil", "/evil"), "load"),
    Crafted("dotdot-path-name", _path_name("../evil", "data/weights/../evil"), "load"),
    Crafted("graph-jsox", _graph_copy("models/model.jsox"), "load"),
    Crafted("graph-upper-case-suffix", _graph_renamed("models/model.JSON"), "load"),
    Crafted("graph-jsox-guards", _guards_in_second_graph, "call"),
    Crafted("graph-duplicate-entry", _duplicate_graph, None),
    Crafted("legacy-weights-pickle", _legacy("data/weights/model.pt"), "load"),
    Crafted("legacy-constants-pickle", _legacy("data/constants/model.pt"), "load"),
    Crafted("entry-outside-root", _outside_root, None),
    Crafted("extra-file", _extra_file, None),
    Crafted("native-code", _native, None),
    Crafted("compressed-entries", _compressed, None),
    # strings in the graph that torch turns into code
    Crafted("sympify-payload", _graph_edit(_sympify), "load"),
    Crafted("guards-code-payload", _graph_edit(_guard, with_example_inputs=True), "call"),
    Crafted("guard-key-breaks-out", _graph_edit(_guard_key, with_example_inputs=True), "call"),
    Crafted("aten-from-file-creates-a-file", _graph_edit(_aten_from_file), "call"),
    Crafted("target-torch-os-system", _graph_edit(_os_system), None),
    Crafted("target-extension-operator", _graph_edit(_extension_operator), None),
    Crafted("metadata-source-fn-stack", _graph_edit(_source_fn_stack), None),
    Crafted("metadata-custom", _graph_edit(_custom_metadata), None),
    Crafted("custom-object-argument", _graph_edit(_custom_object_argument), None),
    Crafted("namedtuple-fields", _graph_edit(_namedtuple_fields), None),
    Crafted("in-spec-type", _graph_edit(_in_spec), None),
    Crafted("node-name", _graph_edit(_node_name), None),
    # resource bombs
    Crafted("zero-byte-weight-384M-elements", _zero_byte_weight, None),
    Crafted("sympy-power-tower", _graph_edit(_power_tower), None),
    Crafted("python-power-tower", _graph_edit(_python_power), None),
    Crafted("deep-graph-json", _deep_graph, None),
    # the manifest
    Crafted("ansi-escapes-in-program", _ansi_program, None),
    Crafted("manifest-wrong-types", _manifest_edit(lambda m: m.update(inputs="input", runtime=[])), None),
    Crafted("manifest-other-inputs", _manifest_edit(lambda m: m.update(inputs=["other"])), None),
    Crafted(
        "manifest-runtime-not-a-buffer",
        _manifest_edit(lambda m: m["runtime"].update(beta="runtime.beta")),
        None,
    ),
    Crafted("manifest-saved-not-returned", _manifest_edit(lambda m: m["saved"].append("extra")), None),
]
SLOW_CRAFTED = [Crafted("deflated-1GiB-graph", _deflated_graph, None)]
