"""Safe save and load: round trips on the zoo, refusals that name the difference, no code runs."""

import json

import pytest
import safetensors
import safetensors.torch
import torch

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.shipping.load import read_manifest
from tests import zoo
from tests.shipping.payloads import pickled, run_in_subprocess
from tests.shipping.programs import PROGRAMS, call_inputs

FAST = ["mlp", "cnn", "tiny_transformer"]
HUGGING_FACE = ["gpt2", "bert", "llama", "minilm"]


def compiled(sample, program, **values):
    cm = tdhook_fx.compile(
        sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    return cm.bind(**values)


def assert_same_results(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        if key == "saved":
            assert got["saved"].keys() == want["saved"].keys()
            for name in want["saved"]:
                torch.testing.assert_close(got["saved"][name], want["saved"][name])
        else:
            torch.testing.assert_close(got[key], want[key])


def round_trip(sample, name, tmp_path, rebuild=True, program=None, values=None):
    program = program or PROGRAMS[name][0]
    cm = compiled(sample, program, **(values or PROGRAMS[name][1]()))
    inputs, sources = call_inputs(cm, sample)
    with torch.no_grad():
        want = cm(*inputs, **sources)
    path = cm.save(tmp_path / f"{name}.safetensors", example=sample.example)
    rebuilt = zoo.ALL[name]() if rebuild else sample  # the colleague's copy of the same base model
    before = {k: v.clone() for k, v in rebuilt.model.state_dict().items()}
    loaded = tdhook_fx.load(path, rebuilt.model)
    with torch.no_grad():
        got = loaded(*inputs, **sources)
    assert_same_results(got, want)
    assert loaded.program == cm.program
    assert loaded.runtime_names == cm.runtime_names
    for key, value in rebuilt.model.state_dict().items():
        assert torch.equal(value, before[key]), "loading must not change the model"


@pytest.mark.parametrize("name", FAST)
def test_save_then_load_gives_the_same_outputs_and_saved_values(name, tmp_path, samples):
    round_trip(samples(name), name, tmp_path)


def test_save_then_load_on_the_same_gpt2(tmp_path, built_in):
    """The built-in GPT-2, loaded onto the model object it was saved from (its capture is cached)."""
    program = "save transformer.h[*].mlp\nsteer transformer.h[1].mlp[:, -1] += $alpha * $v\nprune transformer.h[0].mlp.c_fc.weight 50%"
    values = {"alpha": torch.tensor(3.0), "v": torch.randn(64)}
    round_trip(built_in["gpt2"](), "gpt2", tmp_path, rebuild=False, program=program, values=values)


@pytest.mark.slow
@pytest.mark.parametrize("name", HUGGING_FACE)
def test_save_then_load_on_hugging_face_models(name, tmp_path, samples):
    round_trip(samples(name), name, tmp_path)


@pytest.fixture
def mlp_file(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "save 1\nsteer 2 += $alpha * $v\nprune 0.weight 50%", alpha=torch.tensor(2.0), v=torch.ones(16))
    return cm, cm.save(tmp_path / "mlp.safetensors", example=sample.example)


def test_the_file_is_plain_safetensors_with_a_json_manifest(mlp_file):
    cm, path = mlp_file
    with safetensors.safe_open(str(path), framework="pt") as handle:
        manifest = json.loads(handle.metadata()["tdhook_fx"])
        names = set(handle.keys())
    assert manifest["program"] == cm.program
    assert manifest["capture"]["in_keys"] == ["input"] and manifest["capture"]["frontend"] == "fx"
    assert manifest["capture"]["dynamic_dims"] == [[0]]
    assert names == {"example.0", "bound.alpha", "bound.v", "mask.prune_mask_0_weight"}
    assert read_manifest(path) == manifest


def test_a_loaded_module_keeps_the_saved_masks_even_on_other_weights(mlp_file):
    cm, path = mlp_file
    other = builtin_zoo.mlp(seed=7).model  # magnitude masks computed on it would differ
    loaded = tdhook_fx.load(path, other, check_weights=False)
    assert torch.equal(loaded.graph_module.prune_mask_0_weight, cm.graph_module.prune_mask_0_weight)


def test_another_architecture_is_refused_naming_the_difference(mlp_file):
    _, path = mlp_file
    with pytest.raises(tdhook_fx.ExportError, match=r"module '5': not in the saved model") as deeper:
        tdhook_fx.load(path, builtin_zoo.mlp(depth=4).model)
    assert "(architecture)" in str(deeper.value)
    with pytest.raises(tdhook_fx.ExportError, match=r"tensor '0.weight': 16x16 float32 saved, 8x8 float32 given"):
        tdhook_fx.load(path, builtin_zoo.mlp(width=8).model)
    with pytest.raises(tdhook_fx.ExportError, match=r"model class: saved torch.nn.modules.container.Sequential"):
        tdhook_fx.load(path, torch.nn.Linear(16, 16).eval())


def test_other_weights_are_refused_unless_asked_for(mlp_file):
    cm, path = mlp_file
    other = builtin_zoo.mlp(seed=3).model
    with pytest.raises(tdhook_fx.ExportError, match=r"\(weights\):\n  - weights of '0.weight' differ") as refused:
        tdhook_fx.load(path, other)
    assert "check_weights=False" in str(refused.value)
    loaded = tdhook_fx.load(path, other, check_weights=False)
    assert loaded.program == cm.program


def test_a_model_in_the_other_mode_is_refused(mlp_file):
    _, path = mlp_file
    with pytest.raises(tdhook_fx.ExportError, match=r"(?s)compiled with the model in eval mode.*model.eval\(\)"):
        tdhook_fx.load(path, builtin_zoo.mlp().model.train())


def test_bound_functions_are_not_saved_and_must_be_bound_again(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "steer 2 += $f(value)", f=lambda x: x * 2)
    with pytest.warns(UserWarning, match=r"\$f are code and are not saved"):
        path = cm.save(tmp_path / "f.safetensors", example=sample.example)
    assert read_manifest(path)["functions"] == ["f"]
    loaded = tdhook_fx.load(path, builtin_zoo.mlp().model)
    x = sample.example["input"]
    with pytest.raises(tdhook_fx.BindingError, match=r"no value for \$f"):
        loaded(x)
    loaded.bind(f=lambda x: x * 2)
    torch.testing.assert_close(loaded(x)["output"], cm(x)["output"])


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickled(marker))
    with pytest.raises(tdhook_fx.ExportError, match=r"is not a file written by cm.save"):
        tdhook_fx.load(path, builtin_zoo.mlp().model)
    with pytest.raises(tdhook_fx.ExportError):
        read_manifest(path)
    assert not marker.exists()
    plain = tmp_path / "evil.pt"  # torch.load reads *.safetensors as safetensors: give the control a .pt
    plain.write_bytes(path.read_bytes())
    control = run_in_subprocess(f"import torch; torch.load({str(plain)!r}, weights_only=False)")
    assert marker.exists(), f"the payload must be live for this test to mean anything: {control.stderr}"


def test_files_that_are_not_ours_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, str(plain))
    with pytest.raises(tdhook_fx.ExportError, match=r"has no tdhook_fx manifest"):
        tdhook_fx.load(plain, builtin_zoo.mlp().model)
    future = tmp_path / "future.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, str(future), metadata={"tdhook_fx": '{"format": "tdhook_fx.saved/9"}'})
    with pytest.raises(tdhook_fx.ExportError, match=r"unsupported format 'tdhook_fx.saved/9'"):
        tdhook_fx.load(future, builtin_zoo.mlp().model)
    with pytest.raises(tdhook_fx.ExportError, match=r"no such file"):
        tdhook_fx.load(tmp_path / "missing.safetensors", builtin_zoo.mlp().model)


def test_saving_needs_the_example_when_the_module_does_not_remember_it(tmp_path):
    sample = builtin_zoo.mlp()
    cm = compiled(sample, "save 1")
    cm.example_inputs = None
    with pytest.raises(tdhook_fx.ExportError, match=r"hint: pass them: cm.save\(path, example=td\)"):
        cm.save(tmp_path / "x.safetensors")
    cm.example_inputs = (sample.example["input"],)
    assert tdhook_fx.load(cm.save(tmp_path / "x.safetensors"), sample.model).program == "save 1"
