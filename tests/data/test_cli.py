"""`tdhook-fx collect`: a program over a dataset (random inputs, a saved TensorDict, a saved Hugging Face dataset)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx import zoo
from tdhook_fx.data.examples import random_examples
from tdhook_fx.shipping import cli


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_collect_on_random_inputs(capsys, tmp_path):
    code, out, err = run(capsys, "collect", "mlp", "save 0; save 2 as two", tmp_path / "out", "--examples", 10,
                         "--batch-size", 4, "--dtype", "bfloat16", "--outputs", "output")
    assert code == 0, err
    assert out.splitlines()[0] == f"{tmp_path / 'out'}: 10 rows (mlp on random inputs)"
    assert "  saved.two  16           bfloat16" in out.splitlines()
    sample = zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save 0; save 2 as two", example=sample.example)
    want = cm(random_examples(sample.example, ["input"], 10))
    stored = TensorDict.load_memmap(tmp_path / "out")
    torch.testing.assert_close(stored["saved", "two"], want["saved", "two"].to(torch.bfloat16))
    torch.testing.assert_close(stored["output"], want["output"].to(torch.bfloat16))


def test_collect_a_saved_tensordict_and_a_hugging_face_dataset(capsys, tmp_path):
    sample = zoo.mlp()
    examples = TensorDict(input=torch.randn(9, 16), label=torch.arange(9), batch_size=[9])
    examples.memmap(tmp_path / "data")
    code, _, err = run(capsys, "collect", "mlp", "save 1", tmp_path / "out", "--data", tmp_path / "data", "--outputs", "label")
    assert code == 0, err
    stored = TensorDict.load_memmap(tmp_path / "out")
    cm = tdhook_fx.compile(sample.model, "save 1", example=sample.example)
    torch.testing.assert_close(stored["saved", "1"], cm(examples.clone())["saved", "1"])
    assert stored["label"].tolist() == list(range(9))

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"input": examples["input"].tolist()}).save_to_disk(str(tmp_path / "hf"))
    code, _, err = run(capsys, "collect", "mlp", "save 1", tmp_path / "hf-out", "--data", tmp_path / "hf")
    assert code == 0, err
    torch.testing.assert_close(TensorDict.load_memmap(tmp_path / "hf-out")["saved", "1"], stored["saved", "1"])


def test_collect_mistakes_are_one_line_each(capsys, tmp_path):
    code, out, err = run(capsys, "collect", "mlp", "save 0", tmp_path / "a", "--dtype", "int8")
    assert (code, out) == (1, "") and "not a floating-point torch dtype" in err
    code, _, err = run(capsys, "collect", "mlp", "save 0", tmp_path / "b", "--data", tmp_path / "missing")
    assert code == 1 and "no such dataset directory" in err
    run(capsys, "collect", "mlp", "save 0", tmp_path / "c", "--examples", 4)
    code, _, err = run(capsys, "collect", "mlp", "save 1", tmp_path / "c", "--examples", 4)
    assert code == 1 and "other settings" in err and "Traceback" not in err
    code, _, err = run(capsys, "collect", "mlp", "save 1", tmp_path / "c", "--examples", 4, "--overwrite")
    assert code == 0, err
