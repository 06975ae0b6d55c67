"""Golden syntax error messages: each bad program in golden_errors/ and its full message.

Set TDHOOK_FX_UPDATE_GOLDEN=1 to rewrite the .txt files after a deliberate change, then
review the diff.
"""

import os
from pathlib import Path

import pytest

import tdhook_fx
from tdhook_fx.errors import TdhookFxError

GOLDEN = Path(__file__).parent / "golden_errors"
CASES = sorted(GOLDEN.glob("*.dsl"))


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_error_message(case: Path):
    text = case.read_text()
    with pytest.raises(tdhook_fx.DslSyntaxError) as raised:
        tdhook_fx.parse(text)
    message = str(raised.value)
    expected_file = case.with_suffix(".txt")
    if os.environ.get("TDHOOK_FX_UPDATE_GOLDEN"):
        expected_file.write_text(message + "\n")
    assert message + "\n" == expected_file.read_text()


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_error_is_located(case: Path):
    text = case.read_text()
    with pytest.raises(tdhook_fx.DslSyntaxError) as raised:
        tdhook_fx.parse(text)
    error = raised.value
    assert isinstance(error, TdhookFxError)
    assert 1 <= error.line <= text.count("\n") + 1
    line = text.split("\n")[error.line - 1]
    assert 1 <= error.column <= len(line) + 1
    assert str(error).startswith(f"program:{error.line}:{error.column}: ")
    assert error.__cause__ is None and error.__suppress_context__, "Lark's traceback must not leak"


def test_source_name_appears_in_message():
    with pytest.raises(tdhook_fx.DslSyntaxError, match=r"^steer\.dsl:1:9: "):
        tdhook_fx.parse("steer x = 1", source="steer.dsl")


def test_expected_is_in_words():
    with pytest.raises(tdhook_fx.DslSyntaxError) as raised:
        tdhook_fx.parse("steer x = 1")
    assert raised.value.expected == "'+=', '-=' or '*='"
