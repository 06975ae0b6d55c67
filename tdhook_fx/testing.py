"""Hypothesis strategies for tdhook_fx programs, public for users' own test suites.

`programs()` draws any well-formed program (as an AST in canonical form, so
`parse(str(p)) == p`); `program_texts()` draws its text.
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from tdhook_fx.syntax import ast

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
# Module names as they appear in models: identifiers, container indices, odd names.
module_names = st.one_of(
    identifiers,
    st.integers(0, 20).map(str),
    st.text(st.characters(blacklist_characters="<>\n\r", min_codepoint=32, max_codepoint=126), min_size=1, max_size=6),
)
saved_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:@]{0,10}", fullmatch=True)
small_ints = st.integers(-10, 10)


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


regex_patterns = (
    st.lists(st.sampled_from(["a", "h", "mlp", r"\.", r"\d", "[0-9]", "+", "|", "$", "^", "(0|5)"]), min_size=1, max_size=6)
    .map("".join)
    .filter(_valid_regex)
)

variables = identifiers.map(ast.Var)
bounds = st.one_of(st.none(), small_ints, variables)
slices = st.builds(ast.Slice, bounds, bounds, bounds)
module_entries = st.one_of(
    small_ints.map(ast.IntEntry),
    st.builds(ast.Slice, st.one_of(st.none(), small_ints), st.one_of(st.none(), small_ints), st.one_of(st.none(), small_ints)),
    st.just(ast.AllEntry()),
    st.lists(small_ints, min_size=1, max_size=3).map(lambda v: ast.SetEntry(tuple(v))),
)
tensor_entries = st.one_of(small_ints.map(ast.IntEntry), variables, slices, st.just(ast.EllipsisEntry()))

# Brackets after a module path: they may pick modules (resolution decides).
path_indices = module_entries.map(lambda e: ast.Index((e,)))
# Brackets that can only index a tensor (a comma, `...` or a `$name`).
tensor_indices = st.lists(tensor_entries, min_size=1, max_size=3).map(lambda e: ast.Index(tuple(e))).filter(lambda i: i.is_tensor_index)
any_tensor_indices = st.lists(tensor_entries, min_size=1, max_size=3).map(lambda e: ast.Index(tuple(e)))

segments = st.one_of(
    module_names.map(ast.Attr),
    st.just(ast.AnyAttr()),
    st.lists(module_names, min_size=1, max_size=3).map(lambda n: ast.AttrSet(tuple(n))),
    path_indices,
)
paths = st.lists(segments, min_size=1, max_size=4).map(lambda s: ast.Path(tuple(s)))
regex_paths = regex_patterns.map(ast.RegexPath)
ports = st.one_of(
    st.builds(ast.Port, st.sampled_from(["out", "in"]), st.none()),
    st.builds(ast.Port, st.just("out"), st.integers(0, 3)),
    st.builds(ast.Port, st.just("in"), st.one_of(st.integers(0, 3), identifiers)),
)


@st.composite
def sites(draw, with_index: bool = True) -> ast.Site:
    path = draw(st.one_of(paths, paths, regex_paths))
    call = draw(st.one_of(st.none(), st.integers(0, 3)))
    port = draw(st.one_of(st.none(), ports))
    index = None
    if with_index and draw(st.booleans()):
        unambiguous = call is not None or port is not None or isinstance(path, ast.RegexPath)
        # Straight after a module path, a bracket that could pick a module belongs to the path.
        index = draw(any_tensor_indices if unambiguous else tensor_indices)
    return ast.Site(path, call, port, index)


def expressions(max_leaves: int = 6):
    leaves = st.one_of(
        st.integers(0, 1000).map(ast.Number),
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False).map(ast.Number),
        variables,
        saved_names.map(ast.Saved),
        st.just(ast.Zeros()),
        st.just(ast.Mean()),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(ast.BinOp, st.sampled_from(["+", "-", "*", "/"]), inner, inner),
            inner.map(ast.Neg),
        ),
        max_leaves=max_leaves,
    )


amounts = st.one_of(
    st.integers(0, 100).map(lambda v: ast.Amount(v, True)),
    st.floats(0, 100, allow_nan=False).map(lambda v: ast.Amount(v, True)),
    st.integers(0, 10_000).map(lambda v: ast.Amount(v, False)),
)
criteria = st.one_of(
    st.just(ast.Magnitude()),
    st.builds(ast.Random, st.one_of(st.none(), st.integers(0, 2**31))),
    variables.map(ast.Importance),
)
parameter_paths = st.one_of(
    st.tuples(st.lists(segments, max_size=3), identifiers.map(ast.Attr)).map(lambda p: ast.Path(tuple(p[0]) + (p[1],))),
    regex_paths,
)

statements = st.one_of(
    st.builds(ast.Save, sites(), st.one_of(st.none(), identifiers), st.booleans()),
    st.builds(ast.Set, sites(), expressions(), st.booleans()),
    st.builds(ast.Patch, sites(), st.one_of(st.none(), identifiers)),
    st.builds(ast.Steer, sites(), st.sampled_from(["+=", "-=", "*="]), expressions()),
    st.builds(ast.Prune, parameter_paths, amounts, criteria, st.one_of(st.none(), st.integers(-3, 3))),
    st.builds(ast.Stop, sites()),
)


def programs(max_statements: int = 6):
    """Any well-formed program, as an AST in canonical form."""
    return st.lists(statements, max_size=max_statements).map(lambda s: ast.Program(tuple(s)))


def program_texts(max_statements: int = 6):
    """The canonical text of any well-formed program."""
    return programs(max_statements).map(str)
