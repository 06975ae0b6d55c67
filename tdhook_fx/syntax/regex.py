"""Regular expressions matched in linear time: DSL `/regex/` selectors and tdhook key patterns.

Python's `re` backtracks, so a pattern such as `/(.+)+Z/` takes seconds per 27-character
module name (twice as long for each character more): one line of a program, or one key pattern
given to a method, could hang a compile. Patterns are compiled here with RE2 (the
`google-re2` package) instead, whose matching time grows linearly with the name for every
pattern it accepts. That is a guarantee, not a time limit that depends on the machine, and a
pattern it cannot keep is refused when it is compiled, with the reason.

The syntax is Python's, less what cannot match in linear time: backreferences (`\\1`,
`(?P=name)`), lookarounds (`(?=...)`, `(?<=...)`), atomic groups and possessive repeats. Also,
`\\d`, `\\w` and `\\s` match ASCII characters only, the end of the name is `$` or `\\z` (not
`\\Z`), and a repeat count is at most 1000. `.search` and `.match` mean what they mean in `re`.
"""

from __future__ import annotations

import re

import re2

from tdhook_fx.errors import InvalidPattern

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would also print every refused pattern to stderr

UNSUPPORTED_HINT = (
    "patterns are matched in linear time (RE2): backreferences (\\1), lookarounds ((?=...), (?<=...)) "
    "and atomic or possessive repeats are not available; write the end of a name as $"
)


def compile_pattern(pattern: str):
    """`pattern` compiled for linear-time matching (`.search(name)`, `.match(name)` as in `re`).

    Raises `InvalidPattern` (a ValueError) saying why a pattern cannot be used: Python's own
    message for a malformed pattern, RE2's and what to do instead for one that only `re` takes.
    """
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as error:
        reason = error.args[0].decode("utf-8", "replace") if isinstance(error.args[0], bytes) else str(error)
    try:
        re.compile(pattern)  # only compiled, never matched: is the pattern malformed, or beyond RE2?
    except re.error as error:
        raise InvalidPattern(f"invalid regular expression: {error}") from None
    except RecursionError:  # sre's parser recurses per nested group; RE2 said why already
        pass
    raise InvalidPattern(f"this regular expression cannot be matched in linear time: {reason}", UNSUPPORTED_HINT)
