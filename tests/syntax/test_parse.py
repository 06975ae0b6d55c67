"""The parser: what each construct becomes, spans, and the canonical text round trip."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import tdhook_fx
from tdhook_fx import testing
from tdhook_fx.errors import Span
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import lark_parser


def one(text):
    (statement,) = tdhook_fx.parse(text).statements
    return statement


def path(*names):
    return ast.Path(tuple(ast.Attr(n) if isinstance(n, str) else n for n in names))


def test_save_with_selector_and_name():
    assert one("save transformer.h[*].mlp as m") == ast.Save(
        ast.Site(path("transformer", "h", ast.Index((ast.AllEntry(),)), "mlp")), "m"
    )


def test_steer_expression_precedence():
    statement = one("steer h[2].mlp += $alpha * $v - 1")
    assert statement.op == "+="
    assert statement.value == ast.BinOp(
        "-", ast.BinOp("*", ast.Var("alpha"), ast.Var("v")), ast.Number(1)
    )


def test_call_port_and_tensor_index():
    site = one("patch h[1]@1:in.hidden_states[..., 0:4] from clean").site
    assert site.call == 1
    assert site.port == ast.Port("in", "hidden_states")
    assert site.index == ast.Index((ast.EllipsisEntry(), ast.Slice(0, 4)))


def test_trailing_tensor_index_moves_to_the_site():
    site = one("set h[0].mlp[:, $pos] = 0").site
    assert site.path == path("h", ast.Index((ast.IntEntry(0),)), "mlp")
    assert site.index == ast.Index((ast.Slice(), ast.Var("pos")))


def test_ambiguous_brackets_stay_in_the_path():
    # `mlp[3]` may pick a container element or index the tensor: resolution decides.
    site = one("set h[0].mlp[3] = 0").site
    assert site.index is None
    assert site.path.segments[-1] == ast.Index((ast.IntEntry(3),))


def test_selectors_and_escapes():
    site = one("save <grad>.x.*.{0,5}.<odd/name>[1:3]").site
    assert site.path == path(
        "grad", "x", ast.AnyAttr(), ast.AttrSet(("0", "5")), "odd/name", ast.Index((ast.Slice(1, 3),))
    )


def test_regex_path_with_index():
    site = one(r"save /h\.\d+\.mlp$/[:, 0]").site
    assert site.path == ast.RegexPath(r"h\.\d+\.mlp$")
    assert site.index == ast.Index((ast.Slice(), ast.IntEntry(0)))


def test_grad_statements():
    assert one("save grad h.0 as g").grad
    assert one("set grad h.0 = zeros") == ast.Set(ast.Site(path("h", "0")), ast.Zeros(), grad=True)


def test_prune_defaults_and_options():
    assert one("prune fc.weight 50%") == ast.Prune(path("fc", "weight"), ast.Amount(50, True))
    statement = one("prune fc.weight 12 by random(3) along 0")
    assert statement.amount == ast.Amount(12, False)
    assert statement.criterion == ast.Random(3)
    assert statement.dim == 0
    assert one("prune fc.weight 5% by $scores").criterion == ast.Importance(ast.Var("scores"))


def test_separators_comments_and_blank_lines():
    program = tdhook_fx.parse("\n# comment\nsave a ; save b  # trailing\n\n;stop c\n")
    assert [type(s) for s in program.statements] == [ast.Save, ast.Save, ast.Stop]
    assert tdhook_fx.parse("") == ast.Program(())


def test_spans_point_into_the_text():
    program = tdhook_fx.parse("save a\nsteer b.c += 2 * $v")
    steer = program.statements[1]
    assert steer.span == Span(2, 1, 2, 20)
    assert steer.site.span == Span(2, 7, 2, 10)
    assert steer.value.right.span == Span(2, 18, 2, 20)


def test_equality_ignores_spans():
    assert tdhook_fx.parse("save   a") == tdhook_fx.parse("save a")


def test_keywords_are_whole_words():
    # `out`, `mean`, `as` ... are names wherever a name fits.
    assert one("save out.mean.as").site.path == path("out", "mean", "as")
    with pytest.raises(tdhook_fx.DslSyntaxError):
        tdhook_fx.parse("save x asy")


def test_canonical_text():
    text = "steer  h[2].mlp   +=  -( $a+ $b ) * 2 ; prune fc.weight 50% by magnitude"
    assert str(tdhook_fx.parse(text)) == "steer h[2].mlp += -($a + $b) * 2\nprune fc.weight 50%"
    assert str(one("set <grad>.x = 1 - (2 - 3)")) == "set <grad>.x = 1 - (2 - 3)"


SLOW = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@SLOW
@given(testing.programs())
def test_round_trip(program):
    assert tdhook_fx.parse(str(program)) == program


@SLOW
@given(testing.programs())
def test_canonical_text_is_a_fixed_point(program):
    text = str(program)
    assert str(tdhook_fx.parse(text)) == text


def _only_syntax_errors(text):
    try:
        tdhook_fx.parse(text)
    except tdhook_fx.DslSyntaxError as error:
        assert str(error).startswith("program:")


@SLOW
@given(st.text())
def test_fuzz_arbitrary_text(text):
    _only_syntax_errors(text)


@SLOW
@given(st.text(alphabet="save stopgrad[]{}()*$@:.,;=+-/<>#0123456789xhmlp%\n\t"))
def test_fuzz_dsl_alphabet(text):
    _only_syntax_errors(text)


@SLOW
@given(from_lark(lark_parser(), start="program"))
def test_fuzz_grammar_derived_text(text):
    _only_syntax_errors(text)


def test_parsing_survives_attributes_named_like_the_verbs(monkeypatch):
    # nnsight 0.8 adds a `save` attribute to every object; Lark looks rule callbacks up by name,
    # so a rule named like a verb would call it. The same situation, without nnsight:
    from tdhook_fx.syntax.parse import _ToAst

    for verb in ("save", "set", "patch", "steer", "prune", "stop", "grad"):
        monkeypatch.setattr(_ToAst, verb, lambda *args: 1 / 0, raising=False)
    assert str(tdhook_fx.parse("save x as y; set x = 1; stop x")).splitlines() == ["save x as y", "set x = 1", "stop x"]


def test_parsing_survives_nnsight_patching_every_object():
    import subprocess
    import sys

    pytest.importorskip("nnsight")  # the bench extra installs it (`make test` does)
    script = "import nnsight, tdhook_fx; print(tdhook_fx.parse('save x as y; set x = 1'))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["save x as y", "set x = 1"]


def test_internal_sites_name_a_value_inside_a_module():
    site = tdhook_fx.parse("save transformer.h[0].attn@1:pattern[:, 3] as p").statements[0].site
    assert site.call == 1
    assert site.port == ast.Port("op", "pattern")
    assert str(site) == "transformer.h[0].attn@1:pattern[:, 3]"


@pytest.mark.parametrize("name", ["add_0", "outer", "input_1", "grad", "value"])
def test_an_internal_site_is_any_name_that_is_not_a_port(name):
    assert tdhook_fx.parse(f"save h.0:{name}").statements[0].site.port == ast.Port("op", name)


@pytest.mark.parametrize("name", ["out", "in", "5", "odd name"])
def test_internal_names_that_are_not_plain_print_escaped(name):
    program = ast.Program((ast.Save(ast.Site(ast.Path((ast.Attr("h"),)), port=ast.Port("op", name))),))
    assert str(program) == f"save h:<{name}>"
    assert tdhook_fx.parse(str(program)) == program
