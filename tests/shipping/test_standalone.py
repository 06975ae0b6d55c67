"""Standalone .pt2: it runs in a fresh process without tdhook_fx or transformers, its runtime
values are editable buffers, and the guarded loader refuses archives that could run code."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.shipping import audit
from tests.shipping.payloads import pickled, run_in_subprocess

FRESH = Path(__file__).with_name("fresh_process.py")
MLP_PROGRAM = "save 1\nsteer 2 += $alpha * $v\nprune 0.weight 50%"


def compiled(sample, program, **values):
    cm = tdhook_fx.compile(
        sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    return cm.bind(**values)


def flat(result: dict) -> dict:
    out = {key: value for key, value in result.items() if key != "saved"}
    out.update({f"saved.{key}": value for key, value in result.get("saved", {}).items()})
    return out


def assert_close_dicts(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def run_fresh(archive: Path, inputs: tuple, tmp_path: Path, *edits: str) -> dict:
    torch.save(tuple(inputs), tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, str(FRESH), str(archive), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt"), *edits],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def mlp_archive(tmp_path_factory):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, MLP_PROGRAM, alpha=torch.tensor(2.0), v=torch.ones(16))
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    summary = cm.export(path, example=sample.example)
    return cm, path, summary


# ---- round trips --------------------------------------------------------------------------------


def test_mlp_runs_in_a_fresh_process_without_tdhook_fx_and_its_buffers_edit_the_steer(mlp_archive, tmp_path):
    cm, path, _ = mlp_archive
    x = torch.randn(7, 16)  # another batch size than the example's 4: the batch stays dynamic
    got = run_fresh(path, (x,), tmp_path, "runtime.alpha=0.5")
    with torch.no_grad():
        assert_close_dicts(got["plain"], flat(cm(x)))
        assert_close_dicts(got["edited"], flat(cm(x, alpha=torch.tensor(0.5))))
    assert not torch.allclose(got["plain"]["output"], got["edited"]["output"])


def test_the_summary_names_inputs_and_buffers(mlp_archive):
    _, path, summary = mlp_archive
    assert summary.input_names == ("input",)
    assert summary.runtime_buffers == ("runtime.alpha", "runtime.v")
    assert summary.static_dims == ()
    assert str(summary).startswith(f"wrote {path}")


def test_editing_a_buffer_in_process_changes_the_output_as_expected(mlp_archive):
    cm, path, _ = mlp_archive
    module = tdhook_fx.load_export(path).module()
    x = torch.randn(3, 16)
    module.runtime.v.copy_(torch.full((16,), -1.0))
    with torch.no_grad():
        want = cm(x, v=torch.full((16,), -1.0))
        assert_close_dicts(flat(module(x)), flat(want))


def test_a_runtime_index_stays_editable(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "set 2[:, $i] = 0\nsave 2", i=torch.tensor(3))
    module = tdhook_fx.load_export(cm.export(tmp_path / "index.pt2", example=sample.example).path).module()
    module.runtime.i.fill_(5)
    x = torch.randn(3, 16)
    saved = module(x)["saved"]["2"]
    assert torch.all(saved[:, 5] == 0) and not torch.all(saved[:, 3] == 0)


def test_a_per_example_runtime_value_fixes_the_batch_and_says_so(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "steer 2 += $v", v=torch.randn(4, 16))
    with pytest.warns(UserWarning, match=r"the batch dimension of input is fixed to 4"):
        summary = cm.export(tmp_path / "per_example.pt2", example=sample.example)
    assert summary.static_dims == ("the batch dimension of input is fixed to 4 (a runtime value or index of that size ties it)",)
    assert "note: the batch dimension of input is fixed to 4" in str(summary)


def test_a_patch_program_takes_the_source_inputs_after_the_model_inputs(tmp_path, samples):
    sample = samples("tiny_transformer")
    cm = compiled(sample, "patch blocks[0].ln_2[:, 0]\nsave blocks[1] as out")
    summary = cm.export(tmp_path / "patch.pt2", example=sample.example)
    assert summary.input_names == ("input_ids", "patched_input_ids")
    module = tdhook_fx.load_export(summary.path).module()
    ids, source = torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert_close_dicts(flat(module(ids, source)), flat(cm(ids, patched=(source,))))


def test_gpt2_exports_with_dynamic_batch_and_sequence(tmp_path, built_in):
    sample = built_in["gpt2"]()
    cm = compiled(sample, "save transformer.h[*].mlp\nsteer transformer.h[1].mlp += $alpha * $v",
                  alpha=torch.tensor(3.0), v=torch.randn(64))
    summary = cm.export(tmp_path / "gpt2.pt2", example=sample.example)
    module = tdhook_fx.load_export(summary.path).module()
    ids = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        assert_close_dicts(flat(module(ids)), flat(cm(ids)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "minilm"])
def test_hugging_face_models_run_in_a_fresh_process_without_transformers(name, tmp_path, samples):
    from tests.shipping.programs import PROGRAMS

    sample = samples(name)
    program, values = PROGRAMS[name]
    cm = compiled(sample, program, **values())
    path = cm.export(tmp_path / f"{name}.pt2", example=sample.example).path
    inputs = tuple(sample.example[key] for key in sample.in_keys)
    got = run_fresh(path, inputs, tmp_path)
    with torch.no_grad():
        assert_close_dicts(got["plain"], flat(cm(*inputs)))


# ---- refusals at export ---------------------------------------------------------------------------


def test_what_a_pt2_cannot_carry_is_refused(tmp_path):
    sample = builtin_zoo.mlp()
    with_function = compiled(sample, "steer 2 += $f(value)", f=lambda x: 2 * x)
    with pytest.raises(tdhook_fx.ExportError, match=r"calls the Python function\(s\) \$f"):
        with_function.export(tmp_path / "f.pt2", example=sample.example)
    unbound = compiled(sample, "steer 2 += $v")
    with pytest.raises(tdhook_fx.ExportError, match=r"no value bound for \$v.*\n  hint: cm.bind\(v=tensor\)"):
        unbound.export(tmp_path / "v.pt2", example=sample.example)
    with pytest.raises(tdhook_fx.ExportError, match=r"name the archive \*.pt2"):
        unbound.export(tmp_path / "v.zip", example=sample.example)
    assert not list(tmp_path.iterdir())


def test_saved_gradients_are_refused(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "save grad 1")
    with pytest.raises(tdhook_fx.ExportError, match=r"saves gradients \(1.grad\), which need a backward pass"):
        cm.export(tmp_path / "grad.pt2", example=sample.example)


# ---- inspect and the guarded loader ------------------------------------------------------------


def test_an_archive_from_export_holds_no_pickle_and_no_code(mlp_archive):
    cm, path, _ = mlp_archive
    report = tdhook_fx.inspect_export(path)
    assert report.safe, report.findings()
    assert report.pickled == () and report.native == () and report.code == ()
    kinds = {entry.name: entry.kind for entry in report.entries}
    assert kinds["data/sample_inputs/model.pt"] == "empty"
    assert kinds["models/model.json"] == "graph"
    assert report.manifest["program"] == cm.program
    assert "no pickles, no native code, no Python in the graph" in str(report)


def rewritten(source: Path, target: Path, change) -> Path:
    """A copy of the archive `source` with `change(name, data) -> data` applied to each entry."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            name = info.filename.split("/", 1)[1]
            data = change(name, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def _graph_edit(edit):
    def change(name, data):
        if name != "models/model.json":
            return data
        graph = json.loads(data)
        edit(graph)
        return json.dumps(graph).encode()

    return change


def test_a_pickle_in_the_sample_inputs_is_refused_and_never_runs(mlp_archive, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = pickle_in_sample_inputs(mlp_archive[1], tmp_path / "evil.pt2", marker)
    report = tdhook_fx.inspect_export(evil)
    assert report.pickled == ("data/sample_inputs/model.pt",) and not report.safe
    with pytest.raises(tdhook_fx.ExportError, match=r"refusing to load .*\n  - pickle: data/sample_inputs/model.pt"):
        tdhook_fx.load_export(evil)
    assert not marker.exists()


def pickle_in_sample_inputs(source: Path, target: Path, marker: Path) -> Path:
    return rewritten(
        source, target, lambda name, data: pickled(marker) if name.startswith("data/sample_inputs/") else data
    )


def python_in_a_shape(source: Path, target: Path, marker: Path) -> Path:
    code = f"__import__('builtins').exec(\"open({str(marker)!r}, 'w').write('ran')\") or 1"

    def inject(value):  # into the first symbolic size (the input's dynamic batch)
        if isinstance(value, dict):
            if "expr_str" in value:
                value["expr_str"] = code
                return True
            return any(inject(v) for v in value.values())
        return isinstance(value, list) and any(inject(v) for v in value)

    return rewritten(source, target, _graph_edit(inject))


def test_python_in_a_symbolic_shape_is_refused_and_never_runs(mlp_archive, tmp_path):
    marker = tmp_path / "sympify-ran"
    evil = python_in_a_shape(mlp_archive[1], tmp_path / "sympy.pt2", marker)
    report = tdhook_fx.inspect_export(evil)
    assert any("sympify would eval it" in line for line in report.code), report.code
    with pytest.raises(tdhook_fx.ExportError, match=r"code in the graph: models/model.json: symbolic expression"):
        tdhook_fx.load_export(evil)
    assert not marker.exists()


def test_control_plain_torch_export_load_runs_both_payloads(mlp_archive, tmp_path):
    """Without this, the two tests above could pass with payloads that never worked."""
    pickle_marker, shape_marker = tmp_path / "pickle-ran", tmp_path / "shape-ran"
    archives = [
        pickle_in_sample_inputs(mlp_archive[1], tmp_path / "pickle.pt2", pickle_marker),
        python_in_a_shape(mlp_archive[1], tmp_path / "shape.pt2", shape_marker),
    ]
    loads = "".join(f"\ntry:\n    torch.export.load({str(a)!r})\nexcept Exception:\n    pass" for a in archives)
    run_in_subprocess("import torch" + loads)
    assert pickle_marker.exists() and shape_marker.exists()


@pytest.mark.parametrize(
    "edit, finding",
    [
        (lambda g: g.update(guards_code=["__import__('os').system('true') == 0"]), "guard code"),
        (lambda g: g["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system"), "call target 'torch.os.system'"),
        (lambda g: g["graph_module"]["graph"]["nodes"][0].update(target="torch.ops.evil.run.default"), "call target"),
    ],
    ids=["guard-code", "torch-os-system", "unknown-op-namespace"],
)
def test_code_hidden_in_the_graph_is_found(mlp_archive, tmp_path, edit, finding):
    evil = rewritten(mlp_archive[1], tmp_path / "graph.pt2", _graph_edit(edit))
    report = tdhook_fx.inspect_export(evil)
    assert any(finding in line for line in report.code), report.code
    with pytest.raises(tdhook_fx.ExportError, match="refusing to load"):
        tdhook_fx.load_export(evil)


def _pickled_weight(name, data):
    if name == "data/weights/model_weights_config.json":
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    return data


@pytest.mark.parametrize(
    "change, attribute, expected",
    [
        (_pickled_weight, "pickled", "data/weights/weight_0"),
        (lambda name, data: data, "native", None),  # replaced below: an added shared library
    ],
    ids=["use-pickle-weight", "native-code"],
)
def test_pickled_payloads_and_native_code_are_found(mlp_archive, tmp_path, change, attribute, expected):
    evil = rewritten(mlp_archive[1], tmp_path / "payload.pt2", change)
    if attribute == "native":
        with zipfile.ZipFile(evil, "a") as archive:
            root = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
        expected = "data/aotinductor/model/model.so"
    report = tdhook_fx.inspect_export(evil)
    assert expected in getattr(report, attribute)
    with pytest.raises(tdhook_fx.ExportError, match="refusing to load"):
        tdhook_fx.load_export(evil)


def test_malformed_archives_are_refused(mlp_archive, tmp_path):
    not_zip = tmp_path / "text.pt2"
    not_zip.write_text("hello")
    assert tdhook_fx.inspect_export(not_zip).problems[0].startswith("not a .pt2 (zip) archive")
    with pytest.raises(tdhook_fx.ExportError, match="not a .pt2"):
        tdhook_fx.load_export(not_zip)
    duplicate = rewritten(mlp_archive[1], tmp_path / "dup.pt2", lambda name, data: data)
    with zipfile.ZipFile(duplicate, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr(archive.namelist()[0], b"other")
    assert any("duplicate entries" in p for p in tdhook_fx.inspect_export(duplicate).problems)


def test_trusted_loads_an_archive_with_an_inert_pickle(mlp_archive, tmp_path):
    buffer = io.BytesIO()
    torch.save(((torch.randn(4, 16),), {}), buffer)
    inputs = rewritten(
        mlp_archive[1], tmp_path / "inputs.pt2",
        lambda name, data: buffer.getvalue() if name.startswith("data/sample_inputs/") else data,
    )
    with pytest.raises(tdhook_fx.ExportError, match="refusing"):
        tdhook_fx.load_export(inputs)
    program = tdhook_fx.load_export(inputs, trusted=True)
    assert program.module()(torch.randn(2, 16))["output"].shape == (2, 16)


def test_the_guard_and_sympy_allowlists():
    assert audit._is_plain_guard("L['input_ids'].size()[0] != 64")
    assert audit._is_plain_guard("2 <= L['x'].size()[1] and L['x'].stride()[0] == L['x'].size()[1]")
    assert not audit._is_plain_guard("__import__('os').system('x') == 0")
    assert not audit._is_plain_guard("L['x'].__class__ == 1")
    assert not audit._is_plain_guard("open('f').read() == ''")
    assert audit._is_plain_sympy("Mul(Integer(192), Symbol('s70', positive=True, integer=True))")
    assert audit._is_plain_sympy("Min(Integer(64), Mul(Integer(64), Symbol('s70', positive=True, integer=True)))")
    assert audit._is_plain_sympy("s0*s1 + 3")
    assert not audit._is_plain_sympy("__import__('os').getcwd()")
    assert not audit._is_plain_sympy("Symbol('x').__class__")
    assert not audit._is_plain_sympy("exec('1')")
