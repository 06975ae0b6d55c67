"""DSL text -> AST. Lark's exceptions are translated here, once, into `DslSyntaxError`."""

from __future__ import annotations

import math
from functools import cache

from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.visitors import Transformer_NonRecursive

from tdhook_fx.errors import Diagnostic, DslSyntaxError, InvalidPattern, Span
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.grammar_file import grammar_text
from tdhook_fx.syntax.messages import describe_syntax_error
from tdhook_fx.syntax.regex import compile_pattern

# Each rule of the grammar (by name or alias) and the AST class it becomes.
RULE_TO_AST: dict[str, type] = {
    "program": ast.Program,
    "save_statement": ast.Save,
    "set_statement": ast.Set,
    "patch_statement": ast.Patch,
    "steer_statement": ast.Steer,
    "prune_statement": ast.Prune,
    "stop_statement": ast.Stop,
    "rule_statement": ast.Rule,
    "site": ast.Site,
    "regex_path": ast.RegexPath,
    "path_start": ast.Path,
    "path_attr": ast.Path,
    "path_index": ast.Path,
    "attr": ast.Attr,
    "any_attr": ast.AnyAttr,
    "attr_set": ast.AttrSet,
    "port": ast.Port,
    "index": ast.Index,
    "int_entry": ast.IntEntry,
    "var_entry": ast.Var,
    "ellipsis_entry": ast.EllipsisEntry,
    "all_entry": ast.AllEntry,
    "set_entry": ast.SetEntry,
    "slice_entry": ast.Slice,
    "amount": ast.Amount,
    "magnitude": ast.Magnitude,
    "random": ast.Random,
    "importance": ast.Importance,
    "binop": ast.BinOp,
    "neg": ast.Neg,
    "number": ast.Number,
    "var": ast.Var,
    "saved": ast.Saved,
    "zeros": ast.Zeros,
    "mean": ast.Mean,
    "site_value": ast.SiteValue,
    "call": ast.Call,
}


@cache
def lark_parser() -> Lark:
    return Lark(
        grammar_text(),
        start=["program", "site"],
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
    )


def parse(text: str, *, source: str = "program") -> ast.Program:
    """Parse DSL text into a `Program`; raise `DslSyntaxError` (located) if it is not valid.

    `source` names the text in error messages (`program:LINE:COL: ...`).
    """
    return _parse(text, "program", source)


def parse_site(text: str, *, source: str = "site") -> ast.Site:
    """Parse one DSL site (`transformer.h[0].mlp`, `h.0.attn:out.0`, `act@1`) into an `ast.Site`.

    The method layer names sites given by users this way, as data: nothing else (no statement,
    no second line) can come with the text.
    """
    return _parse(text, "site", source)


def source_text(text: str) -> str:
    """`text` as the parser reads it: a byte order mark at the start (some editors write one)
    becomes a space, so that columns in messages still count it and carets stay in place."""
    return " " + text[1:] if text.startswith("\ufeff") else text


def _parse(text: str, start: str, source: str):
    text = source_text(text)
    try:
        tree = lark_parser().parse(text, start=start)
    except UnexpectedInput as error:
        if start == "site":  # the program-level words ("unknown statement") do not fit a lone site
            raise _not_a_site(error, text, source) from None
        raise _translate(error, text, source) from None
    try:
        node = _ToAst().transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, _Invalid):
            diagnostic = error.orig_exc.diagnostic
            raise DslSyntaxError(diagnostic, text, source) from None
        raise
    deep = ast.too_deep(node)
    if deep is not None:
        raise DslSyntaxError(too_deep_diagnostic(deep), text, source)
    return node


def too_deep_diagnostic(node) -> Diagnostic:
    """The error for a construct nested deeper than `ast.MAX_DEPTH` (found by `ast.too_deep`)."""
    return Diagnostic(
        node.span,
        f"this is nested deeper than {ast.MAX_DEPTH} levels (each operator, sign, call and bracket adds one)",
        (
            (
                "a long sum or product nests one level per term: group its terms in parentheses, "
                "e.g. (a + b + c) + (d + e + f), so each group nests on its own"
            ),
        ),
    )


class _Invalid(Exception):
    """Raised inside the transformer for a well-formed but meaningless construct."""

    def __init__(self, span: Span, message: str, *hints: str):
        super().__init__(message)
        self.diagnostic = Diagnostic(span, message, hints)


def _translate(error: UnexpectedInput, text: str, source: str) -> DslSyntaxError:
    if isinstance(error, UnexpectedCharacters):
        bad, expected = text[error.pos_in_stream], error.allowed
        line, column = error.line, error.column
    elif isinstance(error, UnexpectedToken):
        bad, expected = error.token, error.expected
        line, column = _token_position(error.token, text)
    else:  # pragma: no cover - the LALR parser raises only the two above
        raise error
    patterns = {t.name: t.pattern for t in lark_parser().terminals}
    described = describe_syntax_error(text, _offset(text, line, column), bad, set(expected), patterns)
    start_line, start_column = _position(text, described.start)
    _, end_column = _position(text, described.end)
    end_column = end_column if end_column > start_column else start_column + 1
    span = Span(start_line, start_column, start_line, end_column)
    diagnostic = Diagnostic(span, described.message, tuple(described.hints), described.expected)
    return DslSyntaxError(diagnostic, text, source)


def _not_a_site(error: UnexpectedInput, text: str, source: str) -> DslSyntaxError:
    token = getattr(error, "token", None)
    at_end = token is not None and token.type == "$END"
    line, column = _position(text, len(text)) if at_end else (error.line, error.column)
    message = f"{text!r} is not a site: " + ("it ends too early" if at_end else "unexpected text here")
    expected = "a module path (a.b[0].c, a.*, /regex/), then optionally @CALL, :out.N or :in.NAME, and [INDEX]"
    return DslSyntaxError(Diagnostic(Span(line, column, line, column + 1), message, expected=expected), text, source)


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _token_position(token: Token, text: str) -> tuple[int, int]:
    if token.type != "$END" and token.line is not None and token.line > 0:
        return token.line, token.column
    lines = text.split("\n")  # the end of the last line with more than blanks and a comment
    for number in range(len(lines), 0, -1):
        code = lines[number - 1].split("#", 1)[0].rstrip()
        if code:
            return number, len(code) + 1
    return 1, 1


def _offset(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    return sum(len(l) + 1 for l in lines[: line - 1]) + column - 1


def _span(meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_line, token.end_column)


def _escaped(token: Token) -> str:
    text = str(token)
    return text[1:-1] if token.type == "ESCAPED" else text


# Whole numbers in a program are what torch indexes, counts and seeds with: 64-bit integers.
# A larger literal, or a decimal beyond float64 (it would become inf), is refused where it
# is written, before Python or torch meet it.
LARGEST_INT = 2**63 - 1


def _int(token: Token) -> int:
    text = str(token)
    if len(text.lstrip("-").lstrip("0")) > len(str(LARGEST_INT)) or abs(int(text)) > LARGEST_INT:
        raise _Invalid(
            _token_span(token),
            f"{_shortened(text)} is too large: whole numbers in a program (indices, counts, seeds) "
            "lie between -(2**63 - 1) and 2**63 - 1",
        )
    return int(text)


def _number(token: Token) -> int | float:
    text = str(token)
    if not any(c in text for c in ".eE"):
        return _int(token)
    value = float(text)
    if math.isinf(value):
        raise _Invalid(
            _token_span(token),
            f"{_shortened(text)} is too large for a number: it would be inf",
            "the largest number is about 1.8e308 (float32 sites hold up to about 3.4e38)",
        )
    return value


def _shortened(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):  # any depth of tree without recursion; `too_deep` then bounds it
    # ---- statements ----
    def program(self, meta, children):
        return ast.Program(tuple(children), span=_span(meta))

    def save_statement(self, meta, children):
        grad = _has(children, "GRAD")
        site = _first(children, ast.Site)
        name = next((str(c) for c in children if isinstance(c, Token) and c.type == "NAME"), None)
        return ast.Save(site, name, grad, span=_span(meta))

    def set_statement(self, meta, children):
        grad = _has(children, "GRAD")
        site, value = [c for c in children if not isinstance(c, Token)]
        return ast.Set(site, value, grad, span=_span(meta))

    def patch_statement(self, meta, children):
        site, *rest = children
        source = next((str(c) for c in rest if c.type == "NAME"), None)
        function = next((ast.Var(str(c)[1:], span=_token_span(c)) for c in rest if c.type == "VAR"), None)
        return ast.Patch(site, source, function, span=_span(meta))

    def steer_statement(self, meta, children):
        site, op, value = children
        return ast.Steer(site, str(op), value, span=_span(meta))

    def prune_statement(self, meta, children):
        param, amount, *rest = children
        if isinstance(param, ast.Path) and not isinstance(param.segments[-1], ast.Attr):
            raise _Invalid(
                param.span,
                "a pruned parameter path must end in the parameter's name",
                "for example: prune transformer.h[*].mlp.c_fc.weight 50%",
            )
        criterion = next((c for c in rest if not isinstance(c, Token)), ast.Magnitude())
        dim = next((_int(c) for c in rest if isinstance(c, Token)), None)
        return ast.Prune(param, amount, criterion, dim, span=_span(meta))

    def stop_statement(self, meta, children):
        return ast.Stop(children[0], span=_span(meta))

    def rule_statement(self, meta, children):
        site, name, *args = children
        return ast.Rule(site, str(name), tuple(_number(a) for a in args), span=_span(meta))

    # ---- sites ----
    def site(self, meta, children):
        path, *rest = children
        call = next((_int(c) for c in rest if isinstance(c, Token)), None)
        port = _first(rest, ast.Port)
        index = _first(rest, ast.Index)
        if isinstance(path, ast.Path):
            path, index = _split_tensor_index(path, index, call is not None or port is not None)
        return ast.Site(path, call, port, index, span=_span(meta))

    def regex_path(self, meta, children):
        (token,) = children
        pattern = str(token)[1:-1]
        try:
            compile_pattern(pattern)
        except InvalidPattern as error:
            raise _Invalid(_token_span(token), error.reason, *error.hints) from None
        return ast.RegexPath(pattern, span=_span(meta))

    def path_start(self, meta, children):
        return ast.Path((children[0],), span=_span(meta))

    def path_attr(self, meta, children):
        path, segment = children
        return ast.Path(path.segments + (segment,), span=_span(meta))

    path_index = path_attr

    def attr(self, meta, children):
        return ast.Attr(_escaped(children[0]), span=_span(meta))

    def any_attr(self, meta, children):
        return ast.AnyAttr(span=_span(meta))

    def attr_set(self, meta, children):
        return ast.AttrSet(tuple(_escaped(c) for c in children), span=_span(meta))

    def port(self, meta, children):
        _colon, kind, *item = children
        value = None
        if item:
            value = _int(item[0]) if item[0].type == "INT" else str(item[0])
        return ast.Port(str(kind), value, span=_span(meta))

    def index(self, meta, children):
        node = ast.Index(tuple(children), span=_span(meta))
        if node.is_tensor_index and node.is_selector:
            selector = next(e for e in children if isinstance(e, (ast.AllEntry, ast.SetEntry)))
            raise _Invalid(
                selector.span,
                "a module selector cannot be part of a tensor index",
                "select every element of a tensor dimension with ':' (as in x[:, 3])",
            )
        return node

    def int_entry(self, meta, children):
        return ast.IntEntry(_int(children[0]), span=_span(meta))

    def var_entry(self, meta, children):
        return ast.Var(str(children[0])[1:], span=_span(meta))

    def ellipsis_entry(self, meta, children):
        return ast.EllipsisEntry(span=_span(meta))

    def all_entry(self, meta, children):
        return ast.AllEntry(span=_span(meta))

    def set_entry(self, meta, children):
        return ast.SetEntry(tuple(_int(c) for c in children), span=_span(meta))

    def slice_entry(self, meta, children):
        bounds: list = [None, None, None]
        position = 0
        for child in children:
            if isinstance(child, Token) and child.type == "COLON":
                position += 1
            elif isinstance(child, Token) and child.type == "VAR":
                bounds[position] = ast.Var(str(child)[1:], span=_token_span(child))
            else:
                bounds[position] = _int(child)
        return ast.Slice(*bounds, span=_span(meta))

    # ---- pruning ----
    def amount(self, meta, children):
        number, *percent = children
        value = _number(number)
        span = _span(meta)
        if percent and not 0 <= value <= 100:
            raise _Invalid(span, f"a percentage must lie between 0% and 100%, not {value}%")
        if not percent and not isinstance(value, int):
            raise _Invalid(
                span,
                f"a count of weights must be a whole number, not {number}",
                f"for a fraction of the weights write a percentage: {value * 100:g}%",
            )
        return ast.Amount(value, bool(percent), span=span)

    def magnitude(self, meta, children):
        return ast.Magnitude(span=_span(meta))

    def random(self, meta, children):
        return ast.Random(_int(children[0]) if children else None, span=_span(meta))

    def importance(self, meta, children):
        (token,) = children
        var = ast.Var(str(token)[1:], span=_token_span(token))
        return ast.Importance(var, span=_span(meta))

    # ---- expressions ----
    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, span=_span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[0], span=_span(meta))

    def number(self, meta, children):
        return ast.Number(_number(children[0]), span=_span(meta))

    def var(self, meta, children):
        return ast.Var(str(children[0])[1:], span=_span(meta))

    def saved(self, meta, children):
        return ast.Saved(str(children[0])[1:], span=_span(meta))

    def zeros(self, meta, children):
        return ast.Zeros(span=_span(meta))

    def mean(self, meta, children):
        return ast.Mean(span=_span(meta))

    def site_value(self, meta, children):
        return ast.SiteValue(span=_span(meta))

    def call(self, meta, children):
        token, *args = children
        function = ast.Var(str(token)[1:], span=_token_span(token))
        return ast.Call(function, tuple(args), span=_span(meta))


def _has(children, token_type: str) -> bool:
    return any(isinstance(c, Token) and c.type == token_type for c in children)


def _first(children, cls):
    return next((c for c in children if isinstance(c, cls)), None)


def _split_tensor_index(path: ast.Path, index, after_call_or_port: bool):
    """Move a trailing bracket that can only index a tensor from the path to the site."""
    brackets = [(i, s) for i, s in enumerate(path.segments) if isinstance(s, ast.Index)]
    for position, bracket in brackets:
        if not bracket.is_tensor_index:
            continue
        last = position == len(path.segments) - 1
        if after_call_or_port or not last:
            raise _Invalid(
                bracket.span,
                "a tensor index can only come at the end of a site",
                "write the module path first, then the call (@1) and port (:out), then [...]",
            )
        if len(path.segments) == 1:
            raise _Invalid(
                bracket.span,
                "a site needs a module path before its tensor index",
                "for example: set transformer.h[0].mlp[:, 3] = 0",
            )
        segments = path.segments[:-1]
        span = Span(path.span.line, path.span.column, segments[-1].span.end_line, segments[-1].span.end_column)
        return ast.Path(segments, span=span), bracket
    return path, index
