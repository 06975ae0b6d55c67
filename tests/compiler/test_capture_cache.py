"""The persistent capture cache: a capture stored by one model object is loaded for another
of the same kind (as in a later process); a damaged or tampered entry is ignored and rewritten."""

import dataclasses
import json

import pytest
import torch

import tdhook_fx
import tdhook_fx.compiler.capture as capture_package
from tdhook_fx.compiler.capture import capture, disk
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.capture.stored_graph import ShapeGuards, StoredGraphInvalid
from tdhook_fx import reference
from tests import zoo


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """A cache of this test's own, on (whatever the environment says)."""
    monkeypatch.setattr(disk, "directory", lambda: tmp_path)
    monkeypatch.delenv(disk.ENVIRONMENT, raising=False)
    return tmp_path


class FrontEnds:
    """Counts front-end runs (a capture loaded from the cache runs none)."""

    def __init__(self, monkeypatch):
        self.runs = 0
        original = capture_package._run_frontend

        def counted(*args, **kwargs):
            self.runs += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(capture_package, "_run_frontend", counted)


def captured(name: str, frontend: str = "auto"):
    sample = zoo.ALL[name]()  # a new model object: nothing cached in this process
    inputs = example_inputs(sample.example, sample.in_keys)
    return sample, inputs, *capture(sample.model, inputs, sample.in_keys, sample.out_keys, frontend)


def only_entry(folder):
    entries = list(folder.glob("*.json"))
    assert len(entries) == 1
    return entries[0]


@pytest.mark.parametrize("name", ["mlp", "tiny_transformer"])
def test_a_model_seen_before_is_loaded_not_captured(name, monkeypatch):
    _, _, first, first_table = captured(name)
    runs = FrontEnds(monkeypatch)
    sample, inputs, second, table = captured(name)
    assert runs.runs == 0
    assert second.frontend == first.frontend
    assert second.site_keys == first.site_keys
    assert second.graph_module.code == first.graph_module.code
    assert table.sites == first_table.sites
    assert table.internal == first_table.internal
    with torch.no_grad():
        want = sample.model(*inputs)
    got = second.graph_module(*inputs)[0]
    torch.testing.assert_close(got, want if isinstance(want, torch.Tensor) else want[0])


def test_a_program_on_a_loaded_capture_matches_the_reference():
    captured("tiny_transformer")
    sample = zoo.ALL["tiny_transformer"]()
    program = "save blocks.0\nsave blocks.1.attn\nsteer blocks.0 += 0.5"
    compiled = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    result = compiled(sample.example.clone())
    want = reference.run(sample.model, program, sample.example.clone(), in_keys=sample.in_keys, out_keys=sample.out_keys)
    assert len(want) > 2
    for key, value in want.items():
        torch.testing.assert_close(result[key], value, rtol=1e-5, atol=1e-5)


def test_the_environment_variable_turns_the_cache_off(cache_folder, monkeypatch):
    monkeypatch.setenv(disk.ENVIRONMENT, "0")
    captured("mlp")
    assert not list(cache_folder.iterdir())
    monkeypatch.delenv(disk.ENVIRONMENT)
    captured("mlp")
    monkeypatch.setenv(disk.ENVIRONMENT, "0")
    runs = FrontEnds(monkeypatch)
    captured("mlp")
    assert runs.runs == 1  # stored, but not read


@pytest.mark.parametrize(
    "change",
    [
        lambda model, inputs: (model.double(), (inputs[0].double(),)),
        lambda model, inputs: (model.train(), inputs),
        lambda model, inputs: (model, (inputs[0][None],)),
        lambda model, inputs: (model.__setattr__("1", torch.nn.Tanh()) or model, inputs),
    ],
    ids=["dtype", "mode", "input rank", "module"],
)
def test_a_changed_model_or_input_is_another_entry(change, cache_folder, monkeypatch):
    sample, inputs, _, _ = captured("mlp")
    model, inputs = change(zoo.ALL["mlp"]().model, inputs)
    assert disk.entry_name(model, inputs, sample.in_keys, sample.out_keys, "auto") != only_entry(cache_folder).stem
    runs = FrontEnds(monkeypatch)
    try:
        capture(model, inputs, sample.in_keys, sample.out_keys)
    except tdhook_fx.errors.CaptureError:
        pass  # an input of another rank may not fit the model: no hit either way
    assert runs.runs == 1


def damaged(text: str) -> str:
    return text[: len(text) // 2]


def garbage(text: str) -> str:
    return "\x00\xff not json at all"


def deep(text: str) -> str:
    return "[" * 10_000 + "]" * 10_000


def disallowed_target(text: str) -> str:
    value = json.loads(text)
    call = next(n for n in value["graph"]["nodes"] if n["op"] == "call_function")
    call["target"] = "aten.__class__.default"
    return json.dumps(value)


def python_target(text: str) -> str:
    value = json.loads(text)
    call = next(n for n in value["graph"]["nodes"] if n["op"] == "call_function")
    call["target"] = "builtins.eval"
    return json.dumps(value)


def missing_weight(text: str) -> str:
    value = json.loads(text)
    read = next(n for n in value["graph"]["nodes"] if n["op"] in ("get_attr", "call_module") and n["target"].startswith("model."))
    read["target"] = "model.nowhere.weight"
    return json.dumps(value)


def changed_op(text: str) -> str:
    """A valid graph computing something else: every `add` a `sub` (caught by the output check)."""
    changed = text.replace('"aten.add.Tensor"', '"aten.sub.Tensor"')
    assert changed != text
    return changed


def changed_site(text: str) -> str:
    """A valid graph whose outputs are right but whose first tap reads its input twice over."""
    value = json.loads(text)
    nodes = value["graph"]["nodes"]
    tap = next(i for i, n in enumerate(nodes) if n["target"] == "tap" and n["args"]["tuple"][1].endswith(":in.x") is False)
    source = nodes[tap]["args"]["tuple"][0]
    nodes.insert(tap, {"op": "call_function", "name": "doubled", "target": "aten.mul.Tensor", "args": {"tuple": [source, 2]}, "kwargs": {"dict": {}}})
    tapped = nodes[tap + 1]["name"]
    nodes[tap + 1]["args"]["tuple"][0] = {"node": "doubled"}
    for node in nodes[tap + 2 :]:  # the rest of the graph reads the untapped value: same outputs
        node["args"] = json.loads(json.dumps(node["args"]).replace(json.dumps({"node": tapped}), json.dumps(source)))
    return json.dumps(value)


@pytest.mark.parametrize(
    "tamper", [damaged, garbage, deep, disallowed_target, python_target, missing_weight, changed_op, changed_site]
)
def test_a_damaged_or_tampered_entry_is_ignored_and_rewritten(tamper, cache_folder, monkeypatch):
    name = "tiny_transformer"
    _, _, first, _ = captured(name)
    entry = only_entry(cache_folder)
    good = entry.read_text()
    entry.write_text(tamper(good))
    runs = FrontEnds(monkeypatch)
    sample, inputs, second, _ = captured(name)
    assert runs.runs >= 1  # captured anew
    assert second.graph_module.code == first.graph_module.code
    assert json.loads(entry.read_text()) == json.loads(good)  # and stored anew


def test_an_oversized_entry_is_not_read(cache_folder, monkeypatch):
    captured("mlp")
    entry = only_entry(cache_folder)
    monkeypatch.setattr(disk, "MAX_BYTES", entry.stat().st_size - 1)
    runs = FrontEnds(monkeypatch)
    captured("mlp")
    assert runs.runs == 1


def test_the_parser_bounds_come_before_parsing(monkeypatch):
    with pytest.raises(StoredGraphInvalid, match="deeply"):
        disk.parse(b"[" * (disk.MAX_DEPTH + 1) + b"]" * (disk.MAX_DEPTH + 1))
    assert disk.parse(b'["[[[[", {"a": "]]"}]') == ["[[[[", {"a": "]]"}]
    for raw in (b"NaN", b"[Infinity]", b"\xff"):
        with pytest.raises(StoredGraphInvalid):
            disk.parse(raw)
    monkeypatch.setattr(disk, "MAX_BYTES", 4)
    with pytest.raises(StoredGraphInvalid, match="long"):
        disk.parse(b"[1, 2]")


def bert_with_mask():
    sample = zoo.bert()
    sample.example["attention_mask"] = torch.ones_like(sample.example["input_ids"])
    return dataclasses.replace(sample, in_keys=["input_ids", "attention_mask"])


def test_shape_guards_are_kept_as_data(monkeypatch):
    """BERT's export guards its sequence length (<= 64 positions) and the mask's (== the ids'):
    the stored graph checks the same, as data."""
    monkeypatch.setitem(zoo.ALL, "bert_with_mask", bert_with_mask)
    _, inputs, first, _ = captured("bert_with_mask")
    guards = first.graph_module.meta["tdhook_fx_shape_guards"]
    assert ["==", ["size", 1, 1], ["size", 0, 1]] in guards
    assert ["<=", ["size", 0, 1], 64] in guards
    runs = FrontEnds(monkeypatch)
    _, _, second, _ = captured("bert_with_mask")
    assert runs.runs == 0
    check = second.graph_module._guards_fn
    assert isinstance(check, ShapeGuards)
    ids, mask = inputs
    check(ids, mask)
    with pytest.raises(StoredGraphInvalid, match="shape guard"):
        check(ids, mask[:, :-1])
    long = torch.zeros(ids.shape[0], 65, dtype=ids.dtype)
    with pytest.raises(StoredGraphInvalid, match="shape guard"):
        check(long, long)


def test_a_private_configuration_setting_is_part_of_the_key():
    """Eager and fused attention give the same outputs and module sites but other graphs (the
    internal sites differ): the attention implementation, a private config setting, is keyed."""
    from tdhook_fx import zoo as builtin

    eager, fused = builtin.gpt2(attention="eager"), builtin.gpt2(attention="sdpa")
    inputs = example_inputs(eager.example, eager.in_keys)
    names = {disk.entry_name(s.model, inputs, s.in_keys, s.out_keys, "auto") for s in (eager, fused, builtin.gpt2())}
    assert len(names) == 2
