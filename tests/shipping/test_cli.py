"""The command line: every subcommand on the built-in models, golden `check` errors, exit codes.

Golden files: golden_cli/NAME.dsl is checked (`# check with: --model M` on its first line adds
a model); golden_cli/NAME.txt holds the command, its exit code and its output. Set
TDHOOK_FX_UPDATE_GOLDEN=1 to rewrite them after a deliberate change, then review the diff.
"""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import tdhook_fx
from tdhook_fx.shipping import cli

GOLDEN = Path(__file__).parent / "golden_cli"
CASES = sorted(GOLDEN.glob("*.dsl"))
STEER = "steer transformer.h[2].mlp += $alpha * $v"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_check_output(case, built_in, capsys, monkeypatch):
    monkeypatch.chdir(GOLDEN)
    first = case.read_text().splitlines()[0]
    extra = first.split("check with:")[1].split() if "check with:" in first else []
    code, out, err = run(capsys, "check", case.name, *extra)
    got = f"$ tdhook-fx check {' '.join([case.name, *extra])}\nexit {code}\n{out}{err}"
    expected = case.with_suffix(".txt")
    if os.environ.get("TDHOOK_FX_UPDATE_GOLDEN"):
        expected.write_text(got)
    assert got == expected.read_text()


def test_golden_cases_cover_success_syntax_and_resolution_errors():
    texts = [case.with_suffix(".txt").read_text() for case in CASES]
    assert any("exit 0" in t for t in texts)
    assert any("exit 1" in t and "expected:" in t for t in texts)  # a syntax error
    assert any("exit 1" in t and "--model" in t for t in texts)  # a resolution error


def test_check_refuses_a_missing_file_and_prints_no_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "check", tmp_path / "missing.dsl")
    assert code == 1 and out == ""
    assert err == f"tdhook-fx: error: no such program file: {tmp_path / 'missing.dsl'}\n"


def test_sites_lists_and_filters_by_a_selector(capsys, built_in):
    code, out, _ = run(capsys, "sites", "mlp")
    assert code == 0 and out.splitlines()[0] == "16 sites of mlp"
    assert "  2 (out, 4x16, float32)" in out.splitlines()
    code, out, _ = run(capsys, "sites", "gpt2", "transformer.h[1].mlp")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "14 sites matching transformer.h[1].mlp"
    assert all(line.strip().startswith("transformer.h.1.mlp") for line in lines[1:])
    code, out, _ = run(capsys, "sites", "gpt2", "transformer.h[1].mlp:in")
    assert out.splitlines()[1:] == ["  transformer.h.1.mlp:in.hidden_states (in, 2x8x64, float32)"]
    code, out, _ = run(capsys, "sites", "gpt2", "transformer.h[0].mlp.c_fc.weight")
    assert out.splitlines()[1:] == ["  transformer.h.0.mlp.c_fc.weight (param, 64x256, float32)"]
    code, _, err = run(capsys, "sites", "gpt2", "transformer.h[1].mpl")
    assert code == 1 and "did you mean 'transformer.h.1.mlp'" in err


def test_show_marks_the_inserted_lines(capsys, built_in):
    code, out, err = run(capsys, "show", "gpt2", STEER)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:6] == [
        "program:",
        f"  {STEER}",
        "sites:",
        f"  1 | {STEER}",
        "    -> transformer.h.2.mlp (out, 2x8x64, float32)",
        "runtime values: $alpha, $v",
    ]
    inserted = [line for line in lines if line.startswith("  +  ")]
    assert [re.match(r"  \+\s+(\w+) = ", line).group(1) for line in inserted] == [
        "mul", "fit_transformer_h_2_mlp", "steer_transformer_h_2_mlp",
    ]
    assert "  ~  def forward(self, input_ids, alpha, v):" in lines
    full = run(capsys, "show", "gpt2", STEER, "--full")[1]
    assert len(full.splitlines()) > len(lines) and "not shown" not in full


def test_run_prints_shapes_and_statistics(capsys, built_in, tmp_path):
    program = tmp_path / "steer.dsl"
    program.write_text("save 1\nsteer 2 += $alpha * $v\n")
    code, out, err = run(capsys, "run", "mlp", program, "--set", "alpha=2", "--set", "v=randn")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "mlp: Sequential (fx front end) on input 4x16 float32"
    assert lines[1] == "outputs:" and lines[3] == "saved:"
    assert re.fullmatch(r"  output  4x16 +float32 +mean [+-]\d\.\d{4}  std \d\.\d{4}  min .*", lines[2])
    assert lines[4].startswith("  1       4x16 ")
    code, _, err = run(capsys, "run", "mlp", program)
    assert code == 1 and "needs $alpha, $v: pass --set alpha=... --set v=..." in err
    code, _, err = run(capsys, "run", "mlp", program, "--set", "beta=1", "--set", "v=1")
    assert code == 1 and "no runtime value $beta" in err


def test_run_patches_from_a_generated_source(capsys, built_in):
    code, out, err = run(capsys, "run", "gpt2", "patch transformer.h[1].attn:out.0[:, -1]\nsave transformer.h[1] as h1")
    assert code == 0, err
    assert re.search(r"^  h1 +2x8x64 ", out, re.MULTILINE)


def test_export_writes_a_pt2_or_a_safe_file(capsys, built_in, tmp_path):
    program = "save 1\nsteer 2 *= $scale"
    code, out, err = run(capsys, "export", "mlp", program, tmp_path / "mlp.pt2", "--set", "scale=0.5")
    assert code == 0, err
    assert out.splitlines()[-1] == f"{tmp_path / 'mlp.pt2'}: exactly what cm.export writes: no pickles, no native code, no Python in the graph"
    module = tdhook_fx.load_export(tmp_path / "mlp.pt2").module()
    x = built_in["mlp"]().example["input"]
    assert module.runtime.scale.item() == 0.5 and module(x)["saved"]["1"].shape == (4, 16)
    code, out, err = run(capsys, "export", "mlp", program, tmp_path / "mlp.safetensors", "--set", "scale=0.5")
    assert code == 0, err
    loaded = tdhook_fx.load(tmp_path / "mlp.safetensors", built_in["mlp"]().model)
    assert loaded.program == program
    code, out, _ = run(capsys, "inspect", tmp_path / "mlp.safetensors")
    assert code == 0 and "| steer 2 *= $scale" in out and "bound values: $scale" in out
    code, out, _ = run(capsys, "inspect", tmp_path / "mlp.pt2")
    assert code == 0 and "runtime buffers: runtime.scale" in out


def test_draw_writes_svg(capsys, built_in, tmp_path):
    code, _, err = run(capsys, "draw", "mlp", "steer 2 += $v", tmp_path / "mlp.svg", "--depth", "all")
    assert code == 0, err
    svg = ET.parse(tmp_path / "mlp.svg").getroot()
    assert "steer_2" in ET.tostring(svg, encoding="unicode")
    code, _, err = run(capsys, "draw", "mlp", "steer 2 += $v", tmp_path / "mlp.svg", "--depth", "zero")
    assert code == 1 and "--depth must be auto, all or a whole number" in err


def test_models_from_a_factory(capsys, tmp_path):
    code, out, err = run(capsys, "sites", "tests.zoo:tiny_transformer", "blocks[0].act")
    assert code == 0, err
    assert "  blocks.0.act@1 (out, 3x6x16, float32)" in out.splitlines()
    code, _, err = run(capsys, "sites", "tests.zoo:nothing")
    assert code == 1 and err == "tdhook-fx: error: 'tests.zoo' has no function 'nothing'\n"
    code, _, err = run(capsys, "sites", "no_such_package.models:build")
    assert code == 1 and "cannot import 'no_such_package.models'" in err
    code, _, err = run(capsys, "sites", "tests.zoo:TinyAttention")  # needs arguments: the user's code fails
    assert code == 1 and err.startswith("tdhook-fx: error: the model function tests.zoo:TinyAttention failed: TypeError")
    code, _, err = run(capsys, "sites", "tests.zoo:source_inputs")
    assert code == 1 and "failed: TypeError" in err
    code, _, err = run(capsys, "sites", "torch.nn:Identity")  # an nn.Module needs an example input
    assert code == 1 and "torch.nn:Identity gives a model (Identity) but no example input" in err and "hint: --input" in err
    code, _, err = run(capsys, "sites", "tests.zoo:SMALL")
    assert code == 1 and "'tests.zoo' has no function 'SMALL'" in err


def test_exit_codes(capsys, monkeypatch):
    assert run(capsys, "--help")[0] == 0
    code, _, err = run(capsys, "frobnicate")
    assert code == 1 and "invalid choice: 'frobnicate'" in err
    code, _, err = run(capsys, "sites", "bigmodel")
    assert code == 1 and err.startswith("tdhook-fx: error: unknown model 'bigmodel'; built-in models: gpt2, mlp, minilm")

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "check_command", broken)
    code, _, err = run(capsys, "check", "x.dsl")
    assert code == 2
    assert err.startswith("tdhook-fx: internal error") and "RuntimeError: a bug" in err


def test_python_dash_m_runs_the_command_line(tmp_path):
    program = tmp_path / "ok.dsl"
    program.write_text("save 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "tdhook_fx", "check", str(program)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{program}: ok (1 statement)\n", "")


@pytest.mark.slow
def test_minilm_is_a_built_in_model(capsys):
    code, out, err = run(capsys, "show", "minilm", "steer encoder.layer[0].output += $v")
    assert code == 0, err
    assert "    -> encoder.layer.0.output (out, 2x" in out
