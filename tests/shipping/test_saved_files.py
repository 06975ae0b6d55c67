"""Crafted cm.save files: whatever is not exactly what cm.save writes is refused with a located
ExportError (never AttributeError, KeyError or RecursionError), before any tensor is read."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.shipping import cli, load
from tdhook_fx.shipping.save import MAX_EXAMPLE_BATCH

PROGRAM = "save 1\nsteer 2 += $alpha * $v\nprune 0.weight 50%"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(
        sample.model, PROGRAM, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    cm.bind(alpha=torch.tensor(2.0), v=torch.ones(16))
    return cm, cm.save(tmp_path_factory.mktemp("saved") / "mlp.safetensors", example=sample.example)


def rewritten(source, target, *, manifest=None, tensors=None, raw=None):
    """A copy of a saved file with `manifest(m)` / `tensors(t)` applied in place, or the raw manifest `raw`."""
    with safetensors.safe_open(str(source), framework="pt") as handle:
        value = json.loads(handle.metadata()["tdhook_fx"])
    contents = safetensors.torch.load_file(str(source))
    if manifest:
        manifest(value)
    if tensors:
        tensors(contents)
    safetensors.torch.save_file(
        contents, str(target), metadata={"tdhook_fx": raw if raw is not None else json.dumps(value)}
    )
    return target


def refused(path, match: str, capsys=None):
    with pytest.raises(tdhook_fx.ExportError, match=match):
        tdhook_fx.load(path, builtin_zoo.mlp().model)
    if capsys is not None:
        assert cli.main(["inspect", str(path)]) == cli.USER_ERROR
        err = capsys.readouterr().err
        assert "internal error" not in err and "Traceback" not in err, err


# ---- masks and hashes (issue 14, part 6) ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(16,), (1,), (16, 1), (1, 16)])
def test_a_mask_of_another_shape_is_refused_instead_of_broadcast(saved, tmp_path, shape):
    """copy_ would broadcast it over the 16x16 mask: the pruning would silently disappear."""
    _, path = saved
    evil = rewritten(
        path,
        tmp_path / "mask.safetensors",
        tensors=lambda t: t.update({"mask.prune_mask_0_weight": torch.ones(shape)}),
    )
    size = "x".join(map(str, shape))
    with pytest.raises(
        tdhook_fx.ExportError,
        match=rf"the saved mask mask.prune_mask_0_weight is {size} float32, the program's prune_mask_0_weight is 16x16 float32",
    ):
        tdhook_fx.load(evil, builtin_zoo.mlp().model)


def test_a_mask_of_another_dtype_is_refused(saved, tmp_path):
    _, path = saved
    evil = rewritten(
        path,
        tmp_path / "mask.safetensors",
        tensors=lambda t: t.update({"mask.prune_mask_0_weight": torch.ones(16, 16, dtype=torch.float64)}),
    )
    refused(evil, r"16x16 float64, the program's prune_mask_0_weight is 16x16 float32")


def test_a_fingerprint_without_hashes_is_refused(saved, tmp_path, capsys):
    """ "sha256": {} once passed the weight check (it compared only the hashes present)."""
    _, path = saved
    evil = rewritten(path, tmp_path / "hashes.safetensors", manifest=lambda m: m["model"].update(sha256={}))
    refused(evil, r"lacks the hash of \['0.bias', '0.weight', '2.bias'\]", capsys)
    one = rewritten(path, tmp_path / "one.safetensors", manifest=lambda m: m["model"]["sha256"].pop("4.bias"))
    refused(one, r"lacks the hash of \['4.bias'\]")


def test_other_weights_are_found_even_when_a_hash_is_wrong(saved, tmp_path):
    _, path = saved
    evil = rewritten(
        path,
        tmp_path / "hash.safetensors",
        manifest=lambda m: m["model"]["sha256"].update({"4.bias": "0" * 64}),
    )
    refused(evil, r"weights of '4.bias' differ")


# ---- the manifest's schema (issue 14, part 7) ----------------------------------------------------


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda m: m.update(program=5), "program: expected a string"),
        (lambda m: m.update(capture=[]), "capture: expected an object"),
        (lambda m: m["capture"].update(in_keys="input"), "capture.in_keys: expected a list"),
        (
            lambda m: m["capture"]["example"][0].update(shape="4x16"),
            r"capture.example\[0\].shape: expected a list",
        ),
        (lambda m: m["capture"].update(training="no"), "capture.training: expected true or false"),
        (lambda m: m["capture"].update(frontend="pickle"), "capture.frontend: expected 'fx' or 'export'"),
        (lambda m: m.update(bound={"v": 3}), r"bound\['v'\]: expected a string"),
        (lambda m: m.update(masks=[]), "masks: expected an object"),
        (
            lambda m: m["model"].update(tensors={"x": "y"}),
            r"model.tensors\['x'\]: expected a list of 2 values",
        ),
        (lambda m: m["model"].update(modules=None), "model.modules: expected an object"),
        (
            lambda m: m["model"]["sha256"].update({"0.bias": "not hex"}),
            r"model.sha256\['0.bias'\]: 'not hex' is not of the form",
        ),
        (lambda m: m.pop("masks"), "missing key 'masks'"),
        (lambda m: m.update(extra=1), "unexpected key 'extra'"),
        (
            lambda m: m.update(program="save 1\n\x1b[1A\x1b[2Ksteer 2 += 1000"),
            r"program: a control character '\\x1b'",
        ),
        (lambda m: m["bound"].update(alpha="bound.v"), r"bound\['alpha'\] names the tensor 'bound.v'"),
    ],
)
def test_a_manifest_of_the_wrong_shape_gives_a_located_error(saved, tmp_path, capsys, edit, where):
    _, path = saved
    evil = rewritten(path, tmp_path / "types.safetensors", manifest=edit)
    refused(evil, where, capsys)


@pytest.mark.parametrize(
    "raw, why",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            '{"format": "tdhook_fx.saved/1", "capture": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}",
            "nested too deeply",
        ),
        ("[]", "expected an object"),
        ("{", "not valid JSON"),
        (
            '{"format": "tdhook_fx.saved/1", "program": "' + "x" * (17 << 20) + '"}',
            "more than the 16777216 allowed",
        ),
        ('{"format": "tdhook_fx.saved/1", "program": NaN}', "not valid JSON"),
    ],
)
def test_manifests_that_are_not_json_objects_of_bounded_size(saved, tmp_path, capsys, raw, why):
    _, path = saved
    refused(rewritten(path, tmp_path / "raw.safetensors", raw=raw), why, capsys)


# ---- the tensors ---------------------------------------------------------------------------------


def test_exactly_the_tensors_the_manifest_names(saved, tmp_path):
    _, path = saved
    extra = rewritten(path, tmp_path / "extra.safetensors", tensors=lambda t: t.update(evil=torch.zeros(1)))
    refused(extra, r"it has the unexpected tensor\(s\) evil")
    missing = rewritten(path, tmp_path / "missing.safetensors", tensors=lambda t: t.pop("bound.v"))
    refused(missing, r"it lacks the tensor\(s\) bound.v")
    with pytest.raises(tdhook_fx.ExportError, match="unexpected tensor"):
        load.read_manifest(extra)


def test_the_example_must_have_its_declared_shape_and_dtype(saved, tmp_path):
    _, path = saved
    shape = rewritten(
        path, tmp_path / "shape.safetensors", tensors=lambda t: t.update({"example.0": torch.zeros(2, 16)})
    )
    refused(shape, r"example.0 has the shape \[2, 16\], the manifest says \[4, 16\]")
    dtype = rewritten(
        path,
        tmp_path / "dtype.safetensors",
        tensors=lambda t: t.update({"example.0": torch.zeros(4, 16, dtype=torch.float64)}),
    )
    refused(dtype, "example.0 is float64, the manifest says float32")


def test_a_large_example_is_refused_before_anything_is_compiled(tmp_path, monkeypatch, built_in):
    """A GPT-2 file whose example is 20000 x 8 token ids took 26 s and 3.6 GB to load (the
    capture runs the model on the example three times); it is now refused from the header."""
    sample = built_in["gpt2"]()
    cm = tdhook_fx.compile(
        sample.model,
        "save transformer.h[1].mlp",
        example=sample.example,
        in_keys=sample.in_keys,
        out_keys=sample.out_keys,
    )
    path = cm.save(tmp_path / "gpt2.safetensors", example=sample.example)

    def grow(manifest):
        manifest["capture"]["example"][0]["shape"] = [20000, 8]

    big = rewritten(
        path,
        tmp_path / "big.safetensors",
        manifest=grow,
        tensors=lambda t: t.update({"example.0": torch.zeros(20000, 8, dtype=torch.int64)}),
    )
    monkeypatch.setattr(load, "compile_program", lambda *a, **k: pytest.fail("compiled a refused file"))
    with pytest.raises(
        tdhook_fx.ExportError, match=rf"its example has a batch of 20000 \(at most {MAX_EXAMPLE_BATCH}\)"
    ):
        tdhook_fx.load(big, sample.model)


def test_saving_a_large_example_is_refused_with_a_hint(tmp_path):
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(
        sample.model, "save 1", example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    big = TensorDict(input=torch.randn(MAX_EXAMPLE_BATCH + 1, 16), batch_size=[MAX_EXAMPLE_BATCH + 1])
    with pytest.raises(
        tdhook_fx.ExportError, match=r"a batch of 65 \(at most 64\)(.|\n)*hint: a few rows are enough"
    ):
        cm.save(tmp_path / "big.safetensors", example=big)
    assert not (tmp_path / "big.safetensors").exists()
    cm.save(tmp_path / "ok.safetensors", example=big[:MAX_EXAMPLE_BATCH])
    assert tdhook_fx.load(tmp_path / "ok.safetensors", sample.model).program == "save 1"


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: (1 << 40).to_bytes(8, "little") + data[8:],  # a header length past the end
        lambda data: data[:8] + b"[" + data[9:],  # a header that is not a JSON object
        lambda data: bytes(64),
        lambda data: b"",
    ],
)
def test_corrupt_files_are_refused_with_a_clear_error(saved, tmp_path, corrupt):
    _, path = saved
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(path.read_bytes()))
    refused(bad, "not a file written by cm.save")
    with pytest.raises(tdhook_fx.ExportError, match="not a file written by cm.save"):
        load.read_manifest(bad)
