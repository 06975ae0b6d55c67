"""Text read from a file, made safe to print on a terminal.

A file's strings may hold ANSI escape sequences (which can hide or rewrite what was printed
before them: a `steer ... += 1000` behind a cursor move), carriage returns, bidirectional
overrides or zero-width characters. `escaped` shows every such character as a visible
escape (`\\x1b`, `\\u202e`), so what is printed is what the file holds.
"""

from __future__ import annotations

import unicodedata

# control, format (bidi overrides, zero-width), line/paragraph separators, surrogates, private use, unassigned
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def escaped(text: str, keep_newlines: bool = False) -> str:
    """`text` with each character a terminal could act on shown as an escape.

    With `keep_newlines`, `\\n` stays a line break (for multi-line text printed line by line).
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape(c) if _hidden(c, keep_newlines) else c for c in text)


def hidden_character(text: str, keep_newlines: bool = False) -> str | None:
    """The first character of `text` that `escaped` would escape, or None."""
    if text.isascii() and text.isprintable():
        return None
    return next((c for c in text if _hidden(c, keep_newlines)), None)


def escaped_lines(text: str) -> list[str]:
    """The lines of `text` (split on `\\n` only), each escaped."""
    return [escaped(line) for line in text.split("\n")]


def _hidden(c: str, keep_newlines: bool) -> bool:
    if c == "\t" or (c == "\n" and keep_newlines):  # a tab moves the cursor on, never over text
        return False
    return unicodedata.category(c) in _HIDDEN_CATEGORIES


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
