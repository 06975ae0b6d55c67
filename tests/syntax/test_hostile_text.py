"""Hostile program text: deep nesting, huge numbers, byte order marks, regexes that backtrack.

Only `DslSyntaxError` (located) may come out of `parse`, and whatever `parse` accepts must go
through every walker (printing, comparing, resolving, rewriting, the reference) without a
RecursionError, even when the caller's own stack is already deep.
"""

import sys

import pytest

import tdhook_fx
from tdhook_fx.syntax import ast

MAX = ast.MAX_DEPTH


def syntax_error(text) -> tdhook_fx.DslSyntaxError:
    with pytest.raises(tdhook_fx.DslSyntaxError) as caught:
        tdhook_fx.parse(text)
    return caught.value


# ---- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        " + ".join(["$v"] * 600),  # each term nests one level
        "-" * 100_000 + "1",
        "$f(" * 600 + "1" + ")" * 600,
        "(" * 5_000 + "-" * 5_000 + "1" + ")" * 5_000,
    ],
    ids=["600 terms", "100000 signs", "600 calls", "5000 signs in parentheses"],
)
def test_nesting_deeper_than_the_bound_is_a_located_syntax_error(value):
    error = syntax_error(f"save x\nset h = {value}")
    assert f"nested deeper than {MAX} levels" in str(error)
    assert error.line == 2 and error.column >= 9
    assert "group its terms in parentheses" in str(error)


def test_parentheses_alone_do_not_nest():
    program = tdhook_fx.parse("set h = " + "(" * 100_000 + "1" + ")" * 100_000)
    assert program.statements[0].value == ast.Number(1)


def test_grouping_a_long_sum_in_parentheses_keeps_it_shallow():
    groups = ["(" + " + ".join(["$v"] * 40) + ")"] * 40  # 1600 terms, about 80 levels
    program = tdhook_fx.parse("set h = " + " + ".join(groups))
    assert ast.too_deep(program) is None


def _deepest_accepted(kind: str) -> str:
    """A statement whose expression is as deep as `parse` allows (program and statement are 2 levels)."""
    levels = MAX - 3  # program, statement, then the expression's own levels down to its leaf
    if kind == "sum":
        return "steer 0 += " + " + ".join(["$v"] * (levels + 1))
    if kind == "signs":
        return "steer 0 += " + "-" * levels + "$v"
    return "steer 0 += " + "$f(" * levels + "$v" + ")" * levels


def _with_deep_stack(frames: int, function):
    """Call `function` from `frames` nested Python frames (a deep caller: a framework, a test runner)."""
    if frames == 0:
        return function()
    return _with_deep_stack(frames - 1, function)


@pytest.mark.parametrize("kind", ["sum", "signs", "calls"])
def test_the_deepest_accepted_program_goes_through_every_walker_from_a_deep_caller(kind, samples):
    import torch

    from tdhook_fx import reference

    text = _deepest_accepted(kind)
    program = tdhook_fx.parse(text)
    assert ast.too_deep(program) is None
    mlp = samples("mlp")
    x = mlp.example["input"]
    values = {"v": torch.full((16,), 1e-3), **({"f": torch.tanh} if kind == "calls" else {})}
    headroom = sys.getrecursionlimit() - 450  # frames left to the walkers (the dataclass == and repr use most)

    def everything():
        assert tdhook_fx.parse(str(program)) == program
        assert repr(program) and hash(program) == hash(tdhook_fx.parse(text))
        assert set(ast.variables(program)) <= {"f", "v"}
        compiled = tdhook_fx.compile(mlp.model, text, example=mlp.example)
        got = compiled(x, **values)["output"]
        want = reference.run(mlp.model, text, (x,), values=values)["output"]
        torch.testing.assert_close(got, want)

    _with_deep_stack(headroom - len(_stack()), everything)


def _stack() -> list:
    frame, frames = sys._getframe(), []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def test_a_hand_built_program_of_any_depth_prints():
    node = ast.Number(1)
    for _ in range(100_000):
        node = ast.Neg(node)
    text = str(ast.Set(ast.Site(ast.Path((ast.Attr("h"),))), node))
    assert text == "set h = " + "-" * 100_000 + "1"


# ---- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, column, words",
    [
        ("set h = 1" + "0" * 400, 9, "too large: whole numbers"),
        ("set h = " + "9" * 5_000, 9, "too large: whole numbers"),  # int() refuses more than 4300 digits
        ("set h = 9223372036854775808", 9, "too large: whole numbers"),
        ("set h = 1e999", 9, "would be inf"),
        ("set h = 2 * 1" + "0" * 400 + ".5", 13, "would be inf"),
        ("prune h.weight 5 by random(100000000000000000000000)", 28, "too large: whole numbers"),
        ("set h[:, 99999999999999999999] = 1", 10, "too large: whole numbers"),
    ],
)
def test_numbers_beyond_64_bits_or_float64_are_located_syntax_errors(text, column, words):
    error = syntax_error(text)
    assert (error.line, error.column) == (1, column)
    assert words in str(error)


def test_the_largest_whole_number_and_tiny_decimals_parse():
    assert tdhook_fx.parse("set h = 9223372036854775807").statements[0].value == ast.Number(2**63 - 1)
    assert tdhook_fx.parse("set h = 1e-999").statements[0].value == ast.Number(0.0)


# ---- byte order mark, control characters ------------------------------------------------------


def test_a_byte_order_mark_at_the_start_is_accepted():
    assert str(tdhook_fx.parse("\ufeffsave h # from an editor that writes one\nsave g")) == "save h\nsave g"


def test_errors_after_a_byte_order_mark_keep_their_column():
    error = syntax_error("\ufeffsave h +")
    assert (error.line, error.column) == (1, 9)
    assert str(error).splitlines()[1:3] == ["  1 |  save h +", "    |         ^"]


def test_a_byte_order_mark_elsewhere_is_refused_where_it_is():
    error = syntax_error("save h\n\ufeffsave g")
    assert (error.line, error.column) == (2, 1)


@pytest.mark.parametrize("character", ["\x00", "\x1b", "\x7f"])
def test_control_characters_are_located_errors(character):
    error = syntax_error(f"save h{character}.mlp")
    assert (error.line, error.column) == (1, 7)


# ---- regular expressions ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r"(a)\1", r"h(?=\.0)", r"(?<=h)\.0", r"(?P<n>a)(?P=n)"])
def test_patterns_that_need_backtracking_are_refused_with_the_reason(pattern):
    error = syntax_error(f"save /{pattern}/")
    assert (error.line, error.column) == (1, 6)
    assert "cannot be matched in linear time" in str(error)
    assert "backreferences" in str(error)


def test_malformed_patterns_keep_pythons_message():
    assert "missing ), unterminated subpattern" in str(syntax_error("save /h(0|1/"))


def test_deeply_grouped_patterns_are_no_recursion_error():
    # Python's re parser recurses once per group (RecursionError at about 500); RE2 does not.
    tdhook_fx.parse("save /" + "(" * 2_000 + "h" + ")" * 2_000 + "/")
