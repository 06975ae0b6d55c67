"""Where the grammar lives: `grammar/` in a source checkout, package data in an installed wheel."""

from __future__ import annotations

from pathlib import Path

GRAMMAR_NAME = "interventions.lark"
_PACKAGE = Path(__file__).resolve().parents[1]


def grammar_path() -> Path:
    """The grammar file: shipped inside the wheel, or the checkout's top-level `grammar/`."""
    for folder in (_PACKAGE / "grammar", _PACKAGE.parent / "grammar"):
        candidate = folder / GRAMMAR_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the DSL grammar {GRAMMAR_NAME} is missing from {_PACKAGE / 'grammar'} "
        "(a broken install: reinstall tdhook_fx)"
    )


def grammar_text() -> str:
    return grammar_path().read_text(encoding="utf-8")
