"""The guarded .pt2 loader: every crafted archive is refused with nothing run, its payload is
shown live under plain torch.export.load, and hostile edits drawn by hypothesis are refused or
leave exactly an archive cm.export could have written."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tdhook_fx
from tdhook_fx import zoo as builtin_zoo
from tdhook_fx.shipping import audit, cli
from tdhook_fx.shipping.pt2_code import expression_problem, guard_problem, target_problem
from tdhook_fx.shipping.pt2_format import LIMITS
from tests.shipping import archives
from tests.shipping.archives import CRAFTED, SLOW_CRAFTED

MLP_PROGRAM = "save 1\nsteer 2 += $alpha * $v\nprune 0.weight 50%"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real cm.export archive of the MLP (the source of every crafted archive)."""
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(
        sample.model, MLP_PROGRAM, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys
    )
    cm.bind(alpha=torch.tensor(2.0), v=torch.ones(16))
    return cm.export(tmp_path_factory.mktemp("good") / "mlp.pt2", example=sample.example).path


def build(crafted, good: Path, directory: Path) -> tuple[Path, Path]:
    marker = directory / f"{crafted.name}.ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some archives need
        return crafted.build(good, directory / f"{crafted.name}.pt2", marker), marker


# ---- the fixtures are real: plain torch runs every payload ---------------------------------------


def test_plain_torch_export_load_runs_every_payload(good, tmp_path):
    """Without this, the refusals below could pass with payloads that never worked."""
    live = [c for c in CRAFTED if c.runs]
    built = {c.name: build(c, good, tmp_path) for c in live}
    script = ["import torch"]
    for c in live:
        path, _ = built[c.name]
        call = ".module()(torch.randn(4, 16))" if c.runs == "call" else ""
        script.append(f"try:\n    torch.export.load({str(path)!r}){call}\nexcept Exception:\n    pass")
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(script)], capture_output=True, text=True, timeout=600, check=False
    )
    dead = [name for name, (_, marker) in built.items() if not marker.exists()]
    assert not dead, f"these payloads did not run under plain torch: {dead}\n{result.stderr[-2000:]}"


# ---- every crafted archive is refused, nothing runs ---------------------------------------------


@pytest.mark.parametrize("crafted", CRAFTED, ids=lambda c: c.name)
def test_every_crafted_archive_is_refused_and_nothing_runs(crafted, good, tmp_path, capsys):
    path, marker = build(crafted, good, tmp_path)
    report = tdhook_fx.inspect_export(path)
    assert not report.safe and report.findings()
    with pytest.raises(tdhook_fx.ExportError, match=r"refusing to load .*not exactly what cm.export writes"):
        tdhook_fx.load_export(path)
    assert cli.main(["inspect", str(path)]) == cli.USER_ERROR
    out = capsys.readouterr().out
    assert "UNSAFE to load from others" in out and "\x1b" not in out
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("crafted", SLOW_CRAFTED, ids=lambda c: c.name)
def test_a_deflated_gigabyte_is_refused_before_reading(crafted, good, tmp_path):
    path, _ = build(crafted, good, tmp_path)
    assert path.stat().st_size < 4 << 20
    report = tdhook_fx.inspect_export(path)
    assert any("models/model.json: compressed" in p for p in report.problems), report.problems
    with pytest.raises(tdhook_fx.ExportError, match="refusing"):
        tdhook_fx.load_export(path)


def finding(report, needle: str) -> bool:
    return any(needle in line for line in report.findings())


@pytest.mark.parametrize(
    "name, attribute, needle",
    [
        (
            "sample-inputs-upper-case",
            "pickled",
            "data/sample_inputs/model.PT: differs from an entry cm.export writes only in letter case",
        ),
        ("constant-upper-case", "pickled", "data/constants/TENSOR_0: differs"),
        ("weight-use-pickle", "pickled", "use_pickle is True"),
        ("second-model-with-slash", "problems", "models/a/b.json: a second graph"),
        ("absolute-path-name", "problems", "/evil: not an entry cm.export writes"),
        ("graph-jsox", "problems", "models/model.jsox: a second graph"),
        ("native-code", "native", "data/aotinductor/model/model.so"),
        ("sympify-payload", "code", "sympify would eval it"),
        ("guard-key-breaks-out", "code", "guard code"),
        ("aten-from-file-creates-a-file", "code", "'torch.ops.aten.from_file.default' takes filename: str"),
        ("target-torch-os-system", "code", "'torch.os.system' is not an aten operator"),
        (
            "zero-byte-weight-384M-elements",
            "problems",
            "claims 402653184 elements of data/weights/weight_0, which holds 0",
        ),
        ("python-power-tower", "code", "'10**10**8' has characters outside"),
        ("sympy-power-tower", "code", "raises a power to a power"),
        ("deep-graph-json", "problems", "models/model.json: nested too deeply"),
        ("compressed-entries", "problems", "compressed (torch writes entries stored"),
        ("manifest-wrong-types", "problems", "extra/tdhook_fx.json: inputs: expected a list, found 'input'"),
        ("manifest-other-inputs", "problems", "the forward's argument names are not the manifest's inputs"),
        (
            "manifest-runtime-not-a-buffer",
            "problems",
            "runtime buffer 'runtime.beta' is not a buffer of the graph",
        ),
        ("manifest-saved-not-returned", "problems", "the graph returns 2 values, the manifest names 3"),
        ("ansi-escapes-in-program", "problems", "a control character '\\x1b'"),
    ],
)
def test_refusals_name_the_entry_and_the_reason(name, attribute, needle, good, tmp_path):
    crafted = next(c for c in CRAFTED if c.name == name)
    report = tdhook_fx.inspect_export(build(crafted, good, tmp_path)[0])
    found = getattr(report, attribute)
    assert any(needle in line for line in found), report.findings()


def test_an_archive_from_export_is_accepted_and_says_what_was_checked(good):
    report = tdhook_fx.inspect_export(good)
    assert report.safe, report.findings()
    kinds = {entry.name: entry.kind for entry in report.entries}
    assert kinds["data/sample_inputs/model.pt"] == "empty" and kinds["models/model.json"] == "graph"
    assert report.manifest["program"] == MLP_PROGRAM
    text = str(report)
    assert "exactly what cm.export writes: no pickles, no native code, no Python in the graph" in text
    assert (
        "checked against the graph: inputs (input); outputs (output, saved 1); runtime buffers (runtime.alpha, runtime.v)"
        in text
    )
    assert "not verified: that the graph computes this program" in text


def test_a_loaded_archive_is_torch_reading_only_what_was_checked(good):
    """load_export hands torch a rebuilt archive: the same program as plain torch.export.load."""
    ours, theirs = tdhook_fx.load_export(good), torch.export.load(good)
    assert str(ours.graph) == str(theirs.graph)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours.module()(x)["output"], theirs.module()(x)["output"])
    assert ours.module().runtime.alpha.item() == 2.0


def test_trusted_hands_the_file_to_torch_unchecked(good, tmp_path):
    inputs = archives.edited(
        good,
        tmp_path / "inputs.pt2",
        change=lambda n, d: archives.example_inputs() if n == archives.SAMPLE_INPUTS else d,
    )
    with pytest.raises(tdhook_fx.ExportError, match="refusing"):
        tdhook_fx.load_export(inputs)
    program = tdhook_fx.load_export(inputs, trusted=True)
    assert program.module()(torch.randn(2, 16))["output"].shape == (2, 16)


def test_files_that_are_not_archives(tmp_path):
    text = tmp_path / "text.pt2"
    text.write_text("hello")
    assert tdhook_fx.inspect_export(text).problems[0].startswith("not a .pt2 (zip) archive")
    with pytest.raises(tdhook_fx.ExportError, match="not a .pt2"):
        tdhook_fx.load_export(text)
    empty = tmp_path / "empty.pt2"
    zipfile.ZipFile(empty, "w").close()
    assert tdhook_fx.inspect_export(empty).problems == ("an empty archive",)
    with pytest.raises(tdhook_fx.ExportError, match="cannot read"):
        tdhook_fx.load_export(tmp_path / "missing.pt2")


def test_an_entry_over_its_size_limit_is_refused_before_it_is_read(good, tmp_path, monkeypatch):
    limit = LIMITS["graph"]
    big = archives.edited(
        good, tmp_path / "big.pt2", change=lambda n, d: d + b" " * limit if n == archives.GRAPH else d
    )
    read = audit._Audit._read

    def bounded_read(self, info, cap):
        assert info.file_size <= limit, f"read {info.filename}, over its limit"
        return read(self, info, cap)

    monkeypatch.setattr(audit._Audit, "_read", bounded_read)
    report = tdhook_fx.inspect_export(big)
    assert any(f"more than the {limit} a graph entry may hold" in p for p in report.problems), report.problems


# ---- the grammars of strings torch turns into code ----------------------------------------------


def test_expressions_torch_writes_are_accepted_and_others_refused():
    for text in [
        "Symbol('s70', positive=True, integer=True)",
        "Mul(Integer(32), Symbol('s70', positive=True, integer=True))",
        "Min(Integer(128), Mul(Integer(128), Symbol('s70', positive=True, integer=True)))",
        "Add(Mul(Integer(32), Symbol('s70', positive=True, integer=True)), Integer(-32))",
        "Mul(Integer(2), Pow(Symbol('s70', positive=True, integer=True), Integer(2)))",
        "Eq(FloorDiv(Symbol('s1'), Integer(2)), Integer(3))",
    ]:
        assert expression_problem(text) is None, text
    for text, why in [
        ("10**10**8", "characters outside"),
        ("Pow(Integer(10), Pow(Integer(10), Integer(8)))", "exponent"),
        ("Pow(Pow(Integer(10), Integer(16)), Integer(16))", "power to a power"),
        ("Pow(Integer(10), Integer(100000000))", "exponent"),
        ("Integer(" + "9" * 21 + ")", "malformed Integer"),
        ("__import__('os').getcwd()", "characters outside"),
        ("Symbol('x').__class__", "characters outside"),
        ("exec('1')", "calls 'exec'"),
        ("Symbol('__class__')", "symbol named"),
        ("Integer(1, evaluate=False)", "malformed Integer"),
        ("Mul(" * 300 + ")" * 300, "does not parse"),
        ("LShift(Integer(1), Integer(100000000))", "calls 'LShift'"),
    ]:
        problem = expression_problem(text)
        assert problem and why in problem, (text, problem)


def test_guards_must_be_plain_size_checks_of_the_inputs():
    inputs = {"input_ids", "attention_mask"}
    assert guard_problem("L['input_ids'].size()[1] <= 64", inputs) is None
    assert guard_problem("L['attention_mask'].size()[1] == L['input_ids'].size()[1]", inputs) is None
    assert guard_problem("2 <= L['input_ids'].size()[0] and L['input_ids'].stride()[0] == 8", inputs) is None
    for code in [
        "L['other'].size()[0] == 2",  # not an input
        "L['x\"); print(1); (\"'].size()[0] == 2",  # breaks out of torch's quoted message
        "__import__('os').system('x') == 0",
        "L['input_ids'].__class__ == 1",
        "L['input_ids'].size()[0] ** 10 ** 10 == 1",
        "L['input_ids'].size()[0]\n== 1",
    ]:
        assert guard_problem(code, inputs), code


def test_call_targets_are_value_only_aten_operators():
    assert target_problem("torch.ops.aten.linear.default") is None
    assert target_problem("torch.ops.aten.gelu.default") is None  # approximate: a mode string
    assert target_problem("torch.ops.aten.index.Tensor") is None
    assert target_problem("_operator.mul") is None
    for target in [
        "torch.ops.aten.from_file.default",
        "torch.ops.aten.save.default",
        "torch.ops.aten._print.default",
        "torch.os.system",
        "torch.ops.aten.linear.nonexistent",
        "torch.ops.higher_order.cond",
        "torch.ops.aten.__class__.default",
        "_operator.pow",
        "builtins.eval",
        "torch.ops.aten.manual_seed.default",
        "torch.ops.aten.set_grad_enabled.default",
        "torch.ops.aten._backward.default",
        "torch.ops.aten.add.int",
    ]:
        assert target_problem(target), target


_NAMES = [
    "Symbol",
    "Integer",
    "Add",
    "Mul",
    "Pow",
    "Min",
    "Max",
    "FloorDiv",
    "Mod",
    "Eq",
    "exec",
    "__import__",
    "eval",
]
_TOKENS = st.sampled_from(
    [
        *_NAMES,
        "(",
        ")",
        ", ",
        "'s1'",
        "'x'",
        "2",
        "10",
        "-3",
        "99999999999999999999",
        "**",
        "*",
        "+",
        ".",
        "_",
        "=",
        "positive=True",
        "true",
        " ",
    ]
)


@given(st.lists(_TOKENS, max_size=30).map("".join))
@settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)
def test_every_accepted_expression_sympifies_to_a_plain_expression(text):
    """Strings from sympy's tokens and Python's: any the grammar accepts is plain sympy arithmetic."""
    import sympy

    if expression_problem(text) is not None:
        return
    try:
        value = sympy.sympify(text, locals={"Symbol": sympy.Symbol, "FloorDiv": sympy.floor})
    except (sympy.SympifyError, TypeError, ValueError, AttributeError, SyntaxError):
        return  # refused by sympy itself: nothing ran
    assert isinstance(value, (sympy.Basic, bool, int))


# ---- hypothesis: hostile edits of a good archive ------------------------------------------------


def _case_changed(name: str, data) -> str:
    """`name` with some letters in the other case (at least one)."""
    positions = [i for i, c in enumerate(name) if c.isalpha()]
    chosen = data.draw(st.sets(st.sampled_from(positions), min_size=1, max_size=3))
    return "".join(c.swapcase() if i in chosen else c for i, c in enumerate(name))


_NAME_TRICKS = [
    lambda n, d: _case_changed(n, d),
    lambda n, d: n + d.draw(st.sampled_from(["x", ".bak", "/", " ", "\x00", ".JSON"])),
    lambda n, d: d.draw(st.sampled_from(["/", "./", "../", "data/weights/", "models/", "Models/"])) + n,
    lambda n, d: n.replace("/", d.draw(st.sampled_from(["//", "/./", "\\"])), 1),
    lambda n, d: n.replace("model", d.draw(st.sampled_from(["a/b", "MODEL", "other", "model.jsox"])), 1),
]


def _payload(marker: Path, data) -> bytes:
    kind = data.draw(st.sampled_from(["pickle", "python", "empty", "bytes", "graph"]))
    if kind == "pickle":
        return archives.pickled(marker)
    if kind == "python":
        return archives.python_payload(marker).encode()
    if kind == "bytes":
        return data.draw(st.binary(max_size=64))
    return b"" if kind == "empty" else b"{}"


def _json_edit(value, marker: Path, data):
    """Change one field somewhere in a JSON document: a hostile string, a type, a key."""
    path = []
    node = value
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(
            st.sampled_from(list(node)) if isinstance(node, dict) else st.integers(0, len(node) - 1)
        )
        path.append(key)
        node = node[key]
    replacement = data.draw(
        st.one_of(
            st.sampled_from(
                [
                    archives.python_payload(marker),
                    f"{archives.quoteless_payload(marker)} or 1 == 1",
                    "10**10**8",
                    "torch.os.system",
                    "torch.ops.aten.from_file.default",
                    "/evil",
                    "../weight_0",
                    "weight_0",
                    True,
                    None,
                    1 << 40,
                    -1,
                    "Infinity",
                    [],
                    {},
                    {"as_custom_obj": {"name": "x", "class_fqn": "y"}},
                    "Symbol('s1', positive=True, integer=True)",
                ]
            ),
            st.integers(-5, 5),
            st.text(max_size=8),
        )
    )
    if not path:
        return value  # an edit of nothing
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        parent[
            data.draw(
                st.sampled_from(["use_pickle", "guards_code", "custom", "source_fn_stack", "extra", path[-1]])
            )
        ] = replacement
    else:
        parent[path[-1]] = replacement
    return value


@st.composite
def hostile_edits(draw, good: Path, marker: Path):
    """(description, entries) for one archive edited 1 to 3 times, with edits that stay inside
    the format (bytes of a weight, text of a stack trace, entry order) drawn as often as others."""
    root, entries = archives.read(good)
    entries = list(entries)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(entries) - 1))
        name, data = entries[i]
        edit = draw(
            st.sampled_from(["rename", "add", "duplicate", "drop", "json", "bytes", "reorder", "root"])
        )
        if edit == "rename":
            entries[i] = (draw(st.sampled_from(_NAME_TRICKS))(name, draw(st.data())), data)
        elif edit == "add":
            new = draw(st.sampled_from(_NAME_TRICKS))(name, draw(st.data()))
            entries.append((new, _payload(marker, draw(st.data()))))
        elif edit == "duplicate":
            entries.insert(draw(st.integers(0, len(entries))), (name, _payload(marker, draw(st.data()))))
        elif edit == "drop":
            del entries[i]
        elif edit == "json" and name.endswith(".json") and _is_json(data):  # (not a payload added before)
            entries[i] = (name, json.dumps(_json_edit(json.loads(data), marker, draw(st.data()))).encode())
        elif edit == "bytes" and data:  # same size, other values: still exactly an allowed archive
            entries[i] = (name, bytes(draw(st.binary(min_size=len(data), max_size=len(data)))))
        elif edit == "reorder":
            draw(st.randoms()).shuffle(entries)
        elif edit == "root":
            root = draw(st.sampled_from(["other", "a b", "MLP", "x" * 100]))
        done.append(f"{edit} {name}")
    return ", ".join(done), root, entries


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return False
    return True


@pytest.fixture(scope="module")
def good_names(good) -> list[str]:
    return sorted(name for name, _ in archives.read(good)[1])


def test_hostile_edits_are_refused_or_leave_an_allowed_archive(good, good_names, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    marker = directory / "payload-ran"

    @given(st.data())
    @settings(deadline=None, suppress_health_check=list(HealthCheck))
    def check(data):
        description, root, entries = data.draw(hostile_edits(good, marker))
        path = directory / "edited.pt2"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archives.write(path, root, entries)
        report = tdhook_fx.inspect_export(path)
        if report.safe:  # provably harmless: exactly the entries cm.export writes, loadable, inert
            # (the names as written: zipfile cuts a name at a NUL, so a drawn "weight_0\x00" is "weight_0")
            assert sorted(name for name, _ in archives.read(path)[1]) == good_names, description
            for program in (tdhook_fx.load_export(path), torch.export.load(path)):
                program.module()(torch.randn(3, 16))
        else:
            with pytest.raises(tdhook_fx.ExportError, match="refusing"):
                tdhook_fx.load_export(path)
        assert not marker.exists(), f"a payload ran: {description}"

    check()


def test_the_strategy_draws_accepted_edits_too(good, tmp_path):
    """Same-size weight bytes, another order, another root: all still exactly cm.export's format."""
    _, entries = archives.read(good)
    changed = [
        (n, bytes(len(d)) if n.startswith("data/weights/weight_") else d) for n, d in reversed(entries)
    ]
    path = archives.write(tmp_path / "changed.pt2", "another root", changed)
    assert tdhook_fx.inspect_export(path).safe
    assert torch.all(tdhook_fx.load_export(path).module()(torch.randn(2, 16))["output"] == 0)


# ---- the command line ---------------------------------------------------------------------------


def test_inspect_escapes_what_the_file_holds(good, tmp_path, capsys):
    """Escape sequences in a program are refused, and every string printed from a file is escaped."""
    spoof = build(next(c for c in CRAFTED if c.name == "ansi-escapes-in-program"), good, tmp_path)[0]
    assert cli.main(["inspect", str(spoof)]) == cli.USER_ERROR
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2K" in out
    report = audit.ArchiveReport(
        "a\x1b[2K.pt2",
        manifest={
            "inputs": ["x\u202e"],
            "program": "save 1\n# \x1b[1A\x1b[2K\rsteer 2 += 1000",
            "runtime": {"v": "runtime.v\x07"},
        },
        checked=("inputs (x\u202e)",),
    )
    text = str(report)
    assert not any(c in text for c in "\x1b\u202e\x07\r")
    assert "  | # \\x1b[1A\\x1b[2K\\x0dsteer 2 += 1000" in text.splitlines()


def test_inspect_of_a_saved_file_escapes_its_manifest(tmp_path, capsys, monkeypatch):
    from tdhook_fx.shipping import load

    manifest = {
        "capture": {"frontend": "fx\x1b]0;", "in_keys": ["in\x1b"], "out_keys": ["out"]},
        "model": {"class": "M\u202e", "tensors": {}},
        "program": "save 1\n\x1b[1A\x1b[2Ksteer 2 += 1000",
        "bound": {"v\x1b": "bound.v"},
        "functions": ["f\x1b"],
    }
    monkeypatch.setattr(load, "read_manifest", lambda path: manifest)
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\u202e") and "\\x1b[2Ksteer 2 += 1000" in out


def test_inspect_exits_quietly_when_its_reader_goes_away(good):
    """`tdhook-fx inspect x.pt2 | head -1`: no traceback, no 'Exception ignored', exit 141 (SIGPIPE's)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tdhook_fx", "inspect", str(good)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # the reader is gone before anything is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""


def test_a_weight_whose_bytes_do_not_match_their_checksum_is_refused_on_loading(good, tmp_path):
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    local_extra = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[info.header_offset + 30 + len(info.filename.encode()) + local_extra] ^= 0xFF
    bad = tmp_path / "crc.pt2"
    bad.write_bytes(bytes(data))
    assert tdhook_fx.inspect_export(bad).safe  # tensor bytes are data: inspect reads their sizes only
    with pytest.raises(tdhook_fx.ExportError, match=r"cannot read .*Bad CRC-32"):
        tdhook_fx.load_export(bad)
