"""Allow-list checks for JSON read from a file: bounded parsing and declared shapes.

`parse_json(raw, limit)` refuses text over `limit` bytes, invalid UTF-8, and nesting
deeper than Python's recursion limit, before anything else looks at it. A `Spec` is a
function `(value, where)` that raises `Invalid(where, message)` unless `value` has exactly
the declared shape: `record` refuses unknown keys, `text` refuses control characters,
`whole` refuses booleans and out-of-range integers. Specs compose (`items(record({...}))`),
so a file's whole format is written down as one value, and `where` locates any refusal
(`graph_module.graph.nodes[3].target`). `Invalid` is `errors.FileFormatError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from tdhook_fx.errors import FileFormatError as Invalid
from tdhook_fx.shipping.printable import hidden_character

Spec = Callable[[object, str], None]

MAX_TEXT = 1 << 16  # characters in a string unless a spec says otherwise


def parse_json(raw: bytes, limit: int):
    """JSON from `raw`, refusing (Invalid) more than `limit` bytes, bad UTF-8 and deep nesting."""
    if len(raw) > limit:
        raise Invalid("", f"{len(raw)} bytes, more than the {limit} allowed")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as error:
        raise Invalid("", f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise Invalid("", "nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers longer than Python converts
        raise Invalid("", f"not valid JSON ({error})") from None


def _no_constant(name: str):
    raise Invalid("", f"not valid JSON ({name} is not a JSON value)")


def shown(value, limit: int = 60) -> str:
    """A short, escaped rendering of a value for an error message."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- leaves -------------------------------------------------------------------------------------


def text(*, max_length: int = MAX_TEXT, pattern: str | None = None, newlines: bool = False) -> Spec:
    """A string: no control characters (`newlines` allows `\\n`), at most `max_length`, matching `pattern`."""
    compiled = re.compile(pattern) if pattern else None

    def check(value, where):
        if not isinstance(value, str):
            raise Invalid(where, f"expected a string, found {shown(value)}")
        if len(value) > max_length:
            raise Invalid(where, f"a string of {len(value)} characters, more than the {max_length} allowed")
        found = hidden_character(value, keep_newlines=newlines)
        if found is not None:
            raise Invalid(where, f"a control character {found!r} in {shown(value)}")
        if compiled and not compiled.fullmatch(value):
            raise Invalid(where, f"{shown(value)} is not of the form {pattern}")

    return check


def whole(low: int = -(1 << 63), high: int = (1 << 63) - 1) -> Spec:
    """An integer (not a boolean) in [low, high]."""

    def check(value, where):
        if type(value) is not int:
            raise Invalid(where, f"expected an integer, found {shown(value)}")
        if not low <= value <= high:
            raise Invalid(where, f"{value} is outside [{low}, {high}]")

    return check


def flag(value, where) -> None:
    """A boolean."""
    if type(value) is not bool:
        raise Invalid(where, f"expected true or false, found {shown(value)}")


def real(value, where) -> None:
    """A float as torch writes it: a number, or "Infinity", "-Infinity", "NaN"."""
    if value in ("Infinity", "-Infinity", "NaN"):
        return
    if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
        raise Invalid(where, f"expected a number, found {shown(value)}")


def const(*allowed) -> Spec:
    """One of the given values (compared with their types: 1 is not True)."""

    def check(value, where):
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise Invalid(where, f"expected {' or '.join(map(repr, allowed))}, found {shown(value)}")

    return check


# ---- containers ---------------------------------------------------------------------------------


def nullable(spec: Spec) -> Spec:
    def check(value, where):
        if value is not None:
            spec(value, where)

    return check


def items(spec: Spec, max_length: int = 1 << 20) -> Spec:
    """A list of values that each satisfy `spec`."""

    def check(value, where):
        if not isinstance(value, list):
            raise Invalid(where, f"expected a list, found {shown(value)}")
        if len(value) > max_length:
            raise Invalid(where, f"a list of {len(value)} items, more than the {max_length} allowed")
        for i, item in enumerate(value):
            spec(item, f"{where}[{i}]")

    return check


def fixed(*specs: Spec) -> Spec:
    """A list of exactly len(specs) values, the i-th satisfying specs[i] (a JSON tuple)."""

    def check(value, where):
        if not isinstance(value, list) or len(value) != len(specs):
            raise Invalid(where, f"expected a list of {len(specs)} values, found {shown(value)}")
        for i, (item, spec) in enumerate(zip(value, specs)):
            spec(item, f"{where}[{i}]")

    return check


def either(*specs: Spec) -> Spec:
    """A value satisfying one of `specs` (the last one's refusal is reported)."""

    def check(value, where):
        for spec in specs[:-1]:
            try:
                spec(value, where)
                return
            except Invalid:
                pass
        specs[-1](value, where)

    return check


def table(key: Spec, value_spec: Spec, max_length: int = 1 << 20) -> Spec:
    """An object used as a mapping: every key satisfies `key`, every value `value_spec`."""

    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(where, f"expected an object, found {shown(value)}")
        if len(value) > max_length:
            raise Invalid(where, f"{len(value)} keys, more than the {max_length} allowed")
        for k, v in value.items():
            key(k, f"{where}.keys()")
            value_spec(v, f"{where}[{k!r}]")

    return check


def record(required: dict[str, Spec], optional: dict[str, Spec] | None = None) -> Spec:
    """An object with exactly the `required` keys, and any of the `optional` ones, nothing else."""
    optional = optional or {}

    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(where, f"expected an object, found {shown(value)}")
        unknown = [k for k in value if k not in required and k not in optional]
        if unknown:
            raise Invalid(
                where, f"unexpected key {shown(unknown[0])} (allowed: {', '.join([*required, *optional])})"
            )
        missing = [k for k in required if k not in value]
        if missing:
            raise Invalid(where, f"missing key {missing[0]!r}")
        for k, v in value.items():
            (required.get(k) or optional[k])(v, f"{where}.{k}" if where else k)

    return check


def one_of(variants: dict[str, Spec]) -> Spec:
    """torch's tagged union: an object with exactly one key, one of `variants`."""

    def check(value, where):
        if not isinstance(value, dict) or len(value) != 1:
            raise Invalid(
                where, f"expected an object with one of the keys {', '.join(variants)}, found {shown(value)}"
            )
        ((tag, inner),) = value.items()
        if tag not in variants:
            raise Invalid(where, f"{shown(tag)} is not allowed here (allowed: {', '.join(variants)})")
        variants[tag](inner, f"{where}.{tag}")

    return check


def both(*specs: Spec) -> Spec:
    """Every one of `specs`."""

    def check(value, where):
        for spec in specs:
            spec(value, where)

    return check
