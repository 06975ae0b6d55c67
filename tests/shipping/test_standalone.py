"""Standalone .pt2: it runs in a fresh process without tdhook_fx or transformers, and its runtime
values are editable buffers (the guarded loader's refusals: test_audit.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo

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
        report = tdhook_fx.inspect_export(path)  # the guarded loader accepts every real export
        assert report.safe, report.findings()
        assert_close_dicts(flat(tdhook_fx.load_export(path).module()(*inputs)), got["plain"])


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
