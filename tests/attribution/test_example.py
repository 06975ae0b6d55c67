"""The plotting example runs end to end and writes its figures."""

import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "attribution_plot.py"


@pytest.mark.slow
def test_attribution_plot_example(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert (tmp_path / "image_attribution.png").stat().st_size > 0
    assert (tmp_path / "token_attribution.png").stat().st_size > 0
