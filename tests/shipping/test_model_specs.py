"""MODEL on the command line: a Hugging Face config file (read as hostile) or a function returning any nn.Module."""

import json

import pytest
import torch

from tdhook_fx.errors import CommandLineError
from tdhook_fx.shipping import cli
from tdhook_fx.shipping.model_specs import MAX_CONFIG_BYTES, load_model, parse_input

GPT2 = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 32, "n_head": 2,
    "vocab_size": 100, "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0,
}


def write(tmp_path, data, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_config_file_builds_the_model_with_seeded_random_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    sample = load_model(write(tmp_path, GPT2))
    torch.manual_seed(0)
    want = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in GPT2.items() if k not in ("model_type", "architectures")}))
    assert type(sample.model) is GPT2LMHeadModel and not sample.model.training
    for (name, value), (_, expected) in zip(sample.model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(value, expected), name
    ids = sample.example["input_ids"]
    assert ids.shape == (1, 8) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 100
    assert (sample.in_keys, sample.out_keys) == (["input_ids"], ["logits"])


def test_a_config_folder_without_architectures_builds_the_base_model(tmp_path):
    data = {k: v for k, v in GPT2.items() if k != "architectures"}
    write(tmp_path, data)
    sample = load_model(str(tmp_path), ["input_ids:int64:3x5:0..10", "attention_mask:int64:3x5:1..2"])
    assert type(sample.model).__name__ == "GPT2Model"
    assert sample.out_keys == ["last_hidden_state"] and sample.example.batch_size == torch.Size([3])
    assert int(sample.example["input_ids"].max()) < 10 and bool((sample.example["attention_mask"] == 1).all())


def test_the_command_line_runs_a_program_on_a_config(capsys, tmp_path):
    config = write(tmp_path, GPT2)
    code, out, err = run(capsys, "run", config, "save transformer.h[1]", "--input", "input_ids:int64:2x5")
    assert code == 0, err
    assert "GPT2LMHeadModel (export front end) on input_ids 2x5 int64" in out
    assert "  logits           2x5x100 " in out and "  transformer.h.1  2x5x32 " in out
    code, out, err = run(capsys, "sites", config, "lm_head", "--out-key", "logits")
    assert code == 0 and "lm_head (out, 1x8x100, float32)" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON config file"),
        ("[1, 2]", "holds a JSON object, not a list"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ({"model_type": "no_such_model"}, "model_type 'no_such_model' is not a model type transformers"),
        ({"n_layer": 2}, "model_type 'None' is not a model type"),
        ({**GPT2, "auto_map": {"AutoModel": "evil.Model"}}, "names code of its own (auto_map)"),
        ({**GPT2, "architectures": ["os.system"]}, "architectures names 'os.system', which is not a model class"),
        ({**GPT2, "architectures": ["AutoTokenizer"]}, "which is not a model class of transformers"),
        ({**GPT2, "n_layer": 10**7}, "10000000 layers; the command line builds models of 1 to 256"),
        ({**GPT2, "n_embd": 65536, "n_head": 2}, "parameters, more than the command line builds"),
        ({**GPT2, "n_head": 3}, "cannot build a GPT2LMHeadModel from this config: ValueError"),
        ({"model_type": "\x1b[31mgpt2"}, "model_type '\\x1b[31mgpt2'"),  # a terminal escape, shown escaped
    ],
)
def test_hostile_config_files_are_refused_with_a_reason(tmp_path, capsys, content, message):
    path = write(tmp_path, content)
    code, out, err = run(capsys, "sites", path)
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert message in err
    assert "\x1b" not in err


def test_an_oversized_or_missing_config_file_is_not_read(tmp_path, capsys):
    big = tmp_path / "config.json"
    big.write_text('{"model_type": "gpt2", "pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    code, _, err = run(capsys, "sites", big)
    assert code == 1 and f"a model config is at most {MAX_CONFIG_BYTES:,}" in err
    code, _, err = run(capsys, "sites", tmp_path / "missing.json")
    assert code == 1 and "no such config file" in err and "hint: name a Hugging Face config.json" in err


def test_a_function_returning_any_module_with_an_input_spec(capsys, monkeypatch, tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def mlp():\n    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "def pair():\n    import torch\n    class Two(nn.Module):\n"
        "        def forward(self, x):\n            return {'double': 2 * x, 'half': x / 2}\n    return Two()\n"
    )
    monkeypatch.chdir(tmp_path)
    sample = load_model("my_models:mlp", ["input:float32:4x16"])
    assert sample.in_keys == ["input"] and sample.out_keys == ["output"]
    assert sample.example["input"].shape == (4, 16) and sample.example.batch_size == torch.Size([4])
    code, out, err = run(capsys, "run", "my_models:mlp", "steer 0 += 1", "--input", "input:float32:4x16")
    assert code == 0, err
    assert "my_models:mlp: Sequential (fx front end) on input 4x16 float32" in out
    assert load_model("my_models:pair", ["x:float32:2x3"]).out_keys == ["double"]
    assert load_model("my_models:pair", ["x:float32:2x3"], ["half", "double"]).out_keys == ["half", "double"]
    code, _, err = run(capsys, "sites", "my_models:mlp", "--input", "input:float32:4x5")
    assert code == 1 and "my_models:mlp: the model failed on the example inputs ['input']: RuntimeError" in err
    assert "hint: check the --input names" in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("input", "want NAME:DTYPE:SHAPE[:LOW..HIGH]"),
        ("in-put:float32:2", "must be a Python identifier"),
        ("x:float128:2", "unknown dtype 'float128'"),
        ("x:float32:2x-3", "must be sizes joined by x"),
        ("x:float32:" + "x".join(["2"] * 9), "at most 8 of them"),
        ("x:float32:4096x4096x2", "between 1 and 16777216 elements; this shape has 33554432"),
        ("x:float32:0x3", "this shape has 0"),
        ("x:int64:2:5..5", "LOW..HIGH with LOW < HIGH"),
        ("x:int64:2:0..2.5", "whole-number bounds"),
    ],
)
def test_input_specs_are_checked(spec, message):
    with pytest.raises(CommandLineError, match="--input .*" + message.replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")):
        parse_input(spec)


def test_input_spec_values():
    generator = torch.Generator().manual_seed(0)
    assert parse_input("m:bool:3x2").make(generator).dtype == torch.bool
    floats = parse_input("x:float64:1000:-1..1").make(generator)
    assert floats.dtype == torch.float64 and -1 <= float(floats.min()) and float(floats.max()) < 1
    ints = parse_input("ids:int32:1000:5..7").make(generator)
    assert set(ints.tolist()) == {5, 6} and ints.dtype == torch.int32


def test_input_options_are_only_for_models_without_their_own_example(capsys):
    code, _, err = run(capsys, "sites", "mlp", "--input", "input:float32:2x16")
    assert code == 1 and "a built-in model brings its own example" in err
    code, _, err = run(capsys, "sites", "tests.zoo:tiny_transformer", "--out-key", "logits")
    assert code == 1 and "tests.zoo:tiny_transformer returned its own example" in err
