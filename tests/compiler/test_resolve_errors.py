"""Golden resolution errors against a real model (the test zoo's tiny transformer).

Set TDHOOK_FX_UPDATE_GOLDEN=1 to rewrite the .txt files after a deliberate change.
"""

import os
from pathlib import Path

import pytest

import tdhook_fx

GOLDEN = Path(__file__).parent / "golden_resolution"
CASES = sorted(GOLDEN.glob("*.dsl"))


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_resolution_error(case, samples):
    sample = samples("tiny_transformer")
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        tdhook_fx.compile(sample.model, case.read_text(), example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    message = str(raised.value)
    expected = case.with_suffix(".txt")
    if os.environ.get("TDHOOK_FX_UPDATE_GOLDEN"):
        expected.write_text(message + "\n")
    assert message + "\n" == expected.read_text()


def test_all_problems_are_reported_at_once(samples):
    sample = samples("tiny_transformer")
    with pytest.raises(tdhook_fx.ResolutionError) as raised:
        tdhook_fx.compile(sample.model, (GOLDEN / "24_several_errors_sorted.dsl").read_text(), example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    lines = [d.span.line for d in raised.value.diagnostics]
    assert lines == [1, 2, 3]
    assert str(raised.value).endswith("3 errors")
