"""Words for syntax errors: what went wrong, what could have come, and a hint for common slips.

Works on the program text and the names of the terminals Lark expected, so it never needs
Lark's internals beyond the terminal patterns.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from lark import Token

VERBS = ("save", "set", "patch", "steer", "prune", "stop", "rule")
VALUE_WORDS = "a number, $name, @name, zeros, mean, value or $f(...), combined with + - * / and parentheses"
_NO_PYTHON = (
    f"a value is {VALUE_WORDS}; pass a tensor as $name "
    "(cm.bind(name=tensor), or a key of the input TensorDict)"
)
_EXAMPLES = {
    "save": "save transformer.h[0].mlp",
    "set": "set transformer.h[0].mlp[:, 0] = 0",
    "patch": "patch transformer.h[0].mlp",
    "steer": "steer transformer.h[0].mlp += $alpha * $v",
    "prune": "prune transformer.h[0].mlp.c_fc.weight 50%",
    "stop": "stop transformer.h[0]",
    "rule": "rule features[0] = alpha_beta(2, 1)",
}
_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "a whole number",
    "SIGNED_INT": "an integer",
    "NUMBER": "a number",
    "VAR": "a runtime value ($name)",
    "SAVED": "a saved value (@name)",
    "ESCAPED": "an escaped name (<...>)",
    "REGEX": "a /regex/",
    "STEER_OP": "'+=', '-=' or '*='",
    "ADD_OP": "an operator (+ - * /)",
    "MUL_OP": "an operator (+ - * /)",
    "PORT_KIND": "'out' or 'in'",
    "_SEP": "the end of the statement",
    "$END": "the end of the statement",
    "PERCENT": "'%'",
    "COLON": "':'",
}
_GROUPS = (
    # (terminals or literal values that make up the group, how many must be there, words)
    ({"NAME", "REGEX", "ESCAPED", "INT", "*", "{", "["}, 3, "a module path"),
    ({"NUMBER", "VAR", "SAVED", "zeros", "mean", "value", "(", "-"}, 3, "a value"),
    (set(VERBS), 3, "a statement (save, set, patch, steer, prune, stop or rule)"),
    ({".", "[", "@", ":"}, 2, "more of the site ('.', '[', '@' or ':')"),
)
# What may follow a site, by verb: the parser state after a site is shared by all verbs.
_AFTER_SITE = {"=", "STEER_OP", "NUMBER", "as", "from", "with"}
_AFTER_SITE_BY_VERB = {
    "save": {"as"},
    "set": {"="},
    "steer": {"STEER_OP"},
    "patch": {"from", "with"},
    "prune": {"NUMBER"},
    "stop": set(),
    "rule": {"="},
}


@dataclass
class Described:
    message: str
    hints: list[str]
    expected: str | None
    start: int  # offsets into the text, end exclusive
    end: int


def describe_syntax_error(text, offset, bad, terminals: set[str], patterns) -> Described:
    """Explain a syntax error at `offset`; `bad` is the unexpected Token or character.

    `terminals` are the names of the terminals the parser could have taken there and
    `patterns` maps terminal names to their Lark patterns.
    """
    literal = {name: p.value for name, p in patterns.items() if p.type == "str"}
    literal |= {name: name.removeprefix("_KW_").lower() for name in patterns if name.startswith("_KW_")}
    literal |= {"GRAD": "grad"}
    expected = {literal.get(name, name) for name in terminals}
    start = _statement_start(text, offset)
    prefix = text[start:offset]
    words = prefix.split()
    verb = words[0] if words else None
    value = bad.value if isinstance(bad, Token) else bad
    kind = bad.type if isinstance(bad, Token) else "CHAR"
    at_end = kind in ("$END", "_SEP")
    end = offset + max(1, len(value)) if not at_end else offset + 1
    if verb in _AFTER_SITE_BY_VERB:
        expected = expected - (_AFTER_SITE - _AFTER_SITE_BY_VERB[verb])
    expected_words = _expected_words(expected)

    def result(message, *hints, expected=expected_words, at=(offset, end)):
        return Described(message, list(hints), expected, *at)

    # A statement that does not start with a verb.
    first = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", text[start:])
    if first and first.group(1) not in VERBS:
        word = first.group(1)
        close = difflib.get_close_matches(word, VERBS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "statements start with " + _or(VERBS)
        span = (start + first.start(1), start + first.end(1))
        return result(f"unknown statement '{word}'", hint, expected=None, at=span)
    if verb == "steer" and value == "=" and not _in_expression(prefix):
        site = prefix.split(None, 1)[1].strip() if len(words) > 1 else "SITE"
        return result(
            "steer takes '+=', '-=' or '*=', not '='",
            f"to overwrite the value, use set: set {site} = ...",
        )
    if verb == "set" and kind == "STEER_OP":
        site = " ".join(words[1:]) or "SITE"
        return result(
            f"set takes '=', not '{value}'",
            f"to add to or scale the value, use steer: steer {site} {value} ...",
        )
    unclosed = _unclosed(prefix)
    if unclosed is not None and (at_end or kind == "CHAR" and value in ";\n"):
        bracket, position = unclosed
        closer = {"[": "]", "(": ")", "{": "}"}[bracket]
        at = (start + position, start + position + 1)
        return result(f"unclosed '{bracket}'", f"add the missing '{closer}'", at=at)
    if unclosed is not None and {"]", ")", "}"} & expected:
        bracket, position = unclosed
        closer = {"[": "]", "(": ")", "{": "}"}[bracket]
        hint = f"the '{bracket}' at column {_column(text, start + position)} may be missing its '{closer}'"
        return result(f"unexpected {_describe(kind, value)}", hint)
    if verb in VERBS and at_end:
        operator = re.search(r"(\+=|-=|\*=|=|[-+*/(])\s*\Z", prefix)
        if operator and _in_expression(prefix):
            return result(f"missing value after '{operator.group(1)}'", f"a value is {VALUE_WORDS}")
        if len(words) == 1 or words[1:] == ["grad"]:
            return result(f"'{' '.join(words)}' needs a site", f"for example: {_EXAMPLES[verb]}")
        if words[-1] in ("as", "from"):
            what = "a name for the saved value" if words[-1] == "as" else "the name of the source"
            return result(f"missing {what} after '{words[-1]}'", expected="a name")
        if verb == "set" and "=" not in prefix:
            return result("'set' needs '=' and a value", f"for example: {_EXAMPLES['set']}")
        if verb == "steer" and not _in_expression(prefix):
            return result("'steer' needs '+=', '-=' or '*=' and a value", f"for example: {_EXAMPLES['steer']}")
    if prefix.rstrip().endswith(":") and kind == "NAME":
        return result(f"unknown port '{value}'", "ports are :out, :out.N, :in, :in.N and :in.NAME")
    if prefix.rstrip().endswith("@") and kind != "INT":
        return result(
            f"unexpected {_describe(kind, value)} after '@'",
            "a call index is a whole number: act@0 is the first call of act, act@1 the second",
        )
    if value in VERBS and not at_end:
        return result(
            f"unexpected '{value}': a new statement must start on a new line",
            "put each statement on its own line, or separate them with ';'",
        )
    if value == "$" or (kind == "CHAR" and value == "$"):
        return result("'$' must be followed by a name", "a runtime value looks like $alpha")
    if kind == "CHAR" and value in "'\"":
        if _in_expression(prefix):
            return result("the DSL has no strings", _NO_PYTHON)
        return result("module paths are written without quotes", f"for example: {_EXAMPLES['save']}")
    if _in_expression(prefix) and (kind in ("NAME", "CHAR") or value in ("(", "[", "*", "**", ".")):
        return result(f"unexpected {_describe(kind, value)}: the DSL has no Python expressions", _NO_PYTHON)
    if verb == "prune" and len(words) == 2 and "NUMBER" in expected:
        return result(
            f"missing amount before {_describe(kind, value)}",
            "write a percentage (prune PARAM 50%) or a count of weights (prune PARAM 100)",
        )
    return result(f"unexpected {_describe(kind, value)}")


def _statement_start(text: str, offset: int) -> int:
    return max(text.rfind("\n", 0, offset), text.rfind(";", 0, offset)) + 1


def _column(text: str, offset: int) -> int:
    return offset - (text.rfind("\n", 0, offset) + 1) + 1


def _in_expression(prefix: str) -> bool:
    """True after the `=`/`+=`... of a set or steer (outside any brackets of the site)."""
    depth = 0
    for position, char in enumerate(prefix):
        depth += char == "["
        depth -= char == "]"
        if depth == 0 and char == "=" and prefix[position + 1 : position + 2] != "=":
            return True
    return False


def _unclosed(prefix: str) -> tuple[str, int] | None:
    stack: list[tuple[str, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for position, char in enumerate(prefix):
        if char in "([{":
            stack.append((char, position))
        elif char in pairs and stack and stack[-1][0] == pairs[char]:
            stack.pop()
    return stack[-1] if stack else None


def _describe(kind: str, value: str) -> str:
    if kind == "$END":
        return "end of the program"
    if kind == "_SEP":
        return "end of the line" if value == "\n" else "';'"
    if kind == "NAME":
        return f"name '{value}'"
    if kind in ("NUMBER", "INT", "SIGNED_INT"):
        return f"number {value}"
    if kind == "CHAR":
        return f"character {value!r}"
    return f"'{value}'"


def _expected_words(expected: set[str]) -> str | None:
    items, words = set(expected), []
    for members, at_least, group_words in _GROUPS:
        if len(items & members) >= at_least:
            items -= members
            words.append(group_words)
    words += [_TERMINAL_WORDS.get(item) or f"'{item}'" for item in sorted(items)]
    return _or(dict.fromkeys(words)) if words else None


def _or(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
