"""The persistent capture cache: a capture stored by one model object is loaded for another
of the same kind (as in a later process); a damaged or tampered entry is ignored and rewritten;
the folder is the user's alone, bounded in size, and shown and emptied by `tdhook-fx cache`."""

import dataclasses
import json
import os
import time

import pytest
import torch

import tdhook_fx
import tdhook_fx.compiler.capture as capture_package
from tdhook_fx import reference
from tdhook_fx.compiler.capture import capture, disk, shape_guards
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.capture.fingerprint import entry_name
from tdhook_fx.compiler.capture.shape_guards import ShapeGuards
from tdhook_fx.errors import InputShapeError, StoredGraphInvalid
from tdhook_fx.shipping import cli
from tests import zoo


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    """A cache of this test's own, on (whatever the environment says)."""
    monkeypatch.setenv(disk.FOLDER, str(tmp_path))
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


def signature_and_body(entry) -> tuple[bytes, str]:
    raw = entry.read_bytes()
    assert raw[disk.SIGNATURE : disk.SIGNATURE + 1] == b"\n"
    return raw[: disk.SIGNATURE], raw[disk.SIGNATURE + 1 :].decode()


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
    assert entry_name(model, inputs, sample.in_keys, sample.out_keys, "auto") != only_entry(cache_folder).stem
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


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize(
    "tamper", [damaged, garbage, deep, disallowed_target, python_target, missing_weight, changed_op, changed_site]
)
def test_a_damaged_or_tampered_entry_is_ignored_and_rewritten(tamper, signed, cache_folder, monkeypatch):
    """Unsigned: the entry edited without the user's key (caught by the signature, before
    parsing). Signed: as if written with the key (by someone who has it, or by a bug of ours):
    caught by the parser's bounds, the allow-list, or the check against the eager model."""
    name = "tiny_transformer"
    _, _, first, _ = captured(name)
    entry = only_entry(cache_folder)
    signature, good = signature_and_body(entry)
    if signed:
        assert disk._write(entry.stem, tamper(good).encode("utf-8", "surrogateescape"))
    else:
        entry.write_bytes(signature + b"\n" + tamper(good).encode("utf-8", "surrogateescape"))
    runs = FrontEnds(monkeypatch)
    _, _, second, _ = captured(name)
    assert runs.runs >= 1  # captured anew
    assert second.graph_module.code == first.graph_module.code
    assert signature_and_body(entry) == (signature, good)  # and stored anew


def test_an_entry_signed_with_another_key_or_under_another_name_is_ignored(cache_folder, monkeypatch):
    """Another user's (or machine's) entry, or an entry copied to the name of another model."""
    captured("mlp")
    entry = only_entry(cache_folder)
    signature, _ = signature_and_body(entry)
    (cache_folder / disk.KEY).write_text(os.urandom(32).hex())  # the entry's key is not the user's now
    runs = FrontEnds(monkeypatch)
    captured("mlp")
    assert runs.runs == 1
    assert signature_and_body(entry)[0] != signature  # re-signed with the user's key
    moved = cache_folder / ("0" * 64 + ".json")
    moved.write_bytes(entry.read_bytes())
    entry.unlink()
    monkeypatch.setattr("tdhook_fx.compiler.capture.entry_name", lambda *args: moved.stem)
    captured("mlp")
    assert runs.runs == 2


def test_files_are_the_users_alone(cache_folder, monkeypatch):
    captured("mlp")
    for path in (only_entry(cache_folder), cache_folder / disk.KEY):
        assert path.stat().st_mode & 0o777 == 0o600
    (cache_folder / disk.KEY).chmod(0o644)  # readable by others: it signs nothing any more
    runs = FrontEnds(monkeypatch)
    captured("mlp")
    assert runs.runs == 1
    assert (cache_folder / disk.KEY).stat().st_mode & 0o777 == 0o600  # a new key, entries re-signed
    captured("mlp")
    assert runs.runs == 1
    cache_folder.chmod(0o777)  # others may write into the folder: not read, not written
    try:
        entries = {p: p.read_bytes() for p in cache_folder.iterdir()}
        captured("mlp")
        assert runs.runs == 2
        assert {p: p.read_bytes() for p in cache_folder.iterdir()} == entries
        assert not disk.info()["usable"]
    finally:
        cache_folder.chmod(0o700)


def test_the_folder_is_bounded_and_tidied(cache_folder, monkeypatch):
    """The least recently used entries go beyond the limit; a dead writer's temporary file goes
    after an hour, a live writer's stays."""
    captured("mlp")
    old = only_entry(cache_folder)
    os.utime(old, (time.time() - 60, time.time() - 60))
    stale, live = cache_folder / ".tmp-stale", cache_folder / ".tmp-live"
    stale.write_text("x")
    live.write_text("x")
    os.utime(stale, (time.time() - 2 * disk.STALE_SECONDS, time.time() - 2 * disk.STALE_SECONDS))
    monkeypatch.setattr(disk, "MAX_TOTAL", old.stat().st_size * 3 // 2)  # room for one entry
    sample = zoo.ALL["mlp"]()
    bigger = example_inputs(sample.example, sample.in_keys)[0][None]  # another input rank: another entry
    capture(sample.model, (bigger,), sample.in_keys, sample.out_keys)
    assert not old.exists() and len(list(cache_folder.glob("*.json"))) == 1
    assert not stale.exists() and live.exists()


def test_the_cache_command_shows_and_empties_the_folder(cache_folder, capsys):
    captured("mlp")
    assert cli.main(["cache"]) == 0
    shown = capsys.readouterr().out
    assert "on" in shown and str(cache_folder) in shown and "entries: 1," in shown
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not list(cache_folder.iterdir())


def test_an_oversized_entry_is_not_read(cache_folder, monkeypatch):
    captured("mlp")
    entry = only_entry(cache_folder)
    monkeypatch.setattr(disk, "MAX_BYTES", len(signature_and_body(entry)[1]) - 1)
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
    the stored graph checks the same, as data, with the error of a fresh capture."""
    monkeypatch.setitem(zoo.ALL, "bert_with_mask", bert_with_mask)
    _, inputs, first, _ = captured("bert_with_mask")
    guards = first.graph_module.meta["tdhook_fx_shape_guards"]
    assert ["==", ["size", 1, 1], ["size", 0, 1]] in guards
    assert ["<=", ["size", 0, 1], 64] in guards
    runs = FrontEnds(monkeypatch)
    _, _, second, _ = captured("bert_with_mask")
    assert runs.runs == 0
    ids, mask = inputs
    long = torch.zeros(ids.shape[0], 65, dtype=ids.dtype)
    for check in (first.graph_module._guards_fn, second.graph_module._guards_fn):
        assert isinstance(check, ShapeGuards)
        check(ids, mask)
        with pytest.raises(InputShapeError, match=r"attention_mask.size\(1\) == input_ids.size\(1\) \(here 6 and 7"):
            check(ids, mask[:, :-1])
        with pytest.raises(InputShapeError, match=r"input_ids.size\(1\) <= 64 \(here 65 and 64"):
            check(long, long)


def test_a_compiled_module_called_with_inputs_that_break_a_guard_says_so():
    """The user's mistake (a mask shorter than the ids) gets the rule and a fix, whether the
    capture was fresh or read from the cache."""
    sample = bert_with_mask()
    ids, mask = example_inputs(sample.example, sample.in_keys)
    for _ in range(2):  # the second compile reads the stored capture
        compiled = tdhook_fx.compile(zoo.bert().model, "save encoder.layer.0", example=(ids, mask), in_keys=sample.in_keys, out_keys=sample.out_keys)
        with pytest.raises(InputShapeError, match="hint: pass inputs that keep the rule"):
            compiled(ids, mask[:, :-1])


def test_stored_guards_are_checked_before_use():
    for guards in ([["==", ["size", 2, 0], 3]], [["=", 1, 1]], [["<=", ["size", 0, 99], 1]], [["<=", True, 1]], "x"):
        with pytest.raises(StoredGraphInvalid):
            shape_guards.checked(guards, ("input_ids", "attention_mask"))


def test_a_private_configuration_setting_is_part_of_the_key():
    """Eager and fused attention give the same outputs and module sites but other graphs (the
    internal sites differ): the attention implementation, a private config setting, is keyed."""
    from tdhook_fx import zoo as builtin

    eager, fused = builtin.gpt2(attention="eager"), builtin.gpt2(attention="sdpa")
    inputs = example_inputs(eager.example, eager.in_keys)
    names = {entry_name(s.model, inputs, s.in_keys, s.out_keys, "auto") for s in (eager, fused, builtin.gpt2())}
    assert len(names) == 2


def test_processes_starting_together_make_one_key(cache_folder):
    """The first key is linked into place, never renamed over another: every writer that starts
    on an empty folder signs with the same key."""
    import threading

    start = threading.Barrier(8)
    keys = []

    def make():
        start.wait()
        keys.append(disk._key(cache_folder, create=True))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and keys[0] is not None
    assert [p.name for p in cache_folder.iterdir()] == [disk.KEY]  # no temporary file left


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny_transformer", "gpt2", "bert"])
def test_programs_on_a_capture_read_from_the_cache_equal_the_hook_reference(name, monkeypatch):
    """The equivalence property on a model whose capture came from disk: hypothesis draws
    programs over its sites (save, set, steer, patch, prune, stop) and inputs."""
    from tests.compiler.properties import check_against_reference

    captured(name)  # writes the entry
    runs = FrontEnds(monkeypatch)
    sample = zoo.ALL[name]()
    capture(sample.model, example_inputs(sample.example, sample.in_keys), sample.in_keys, sample.out_keys)
    assert runs.runs == 0  # read from the cache
    check_against_reference(sample, examples=8)
    assert runs.runs == 0
