"""The grammar ships inside the wheel: build it, install it in a fresh venv, parse from elsewhere."""

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_installed_wheel_finds_its_grammar(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path / "dist", ROOT],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("tdhook_fx-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel], check=True)
    # The fresh venv borrows this environment's dependencies (torch, lark ...) through a .pth
    # line: a plain path, so this environment's own editable install of tdhook_fx stays unseen.
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
    Path(site.strip(), "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent(
        """
        import tdhook_fx
        from tdhook_fx.syntax.grammar_file import grammar_path
        print(tdhook_fx.__file__)
        print(grammar_path())
        print(tdhook_fx.parse("steer h[2].mlp += $alpha * $v"))
        """
    )
    out = subprocess.check_output([python, "-c", script], cwd=tmp_path, text=True).splitlines()
    assert out[0].startswith(str(venv)), "the installed wheel, not the checkout, must be imported"
    assert out[1].startswith(str(venv)) and out[1].endswith("tdhook_fx/grammar/interventions.lark")
    assert out[2] == "steer h[2].mlp += $alpha * $v"
