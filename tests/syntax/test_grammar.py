"""Meta-tests on the grammar: every rule becomes exactly one AST class, and every class is used."""

from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import RULE_TO_AST, _ToAst, lark_parser

# A program that uses every rule of the grammar at least once.
EVERY_RULE = r"""
save transformer.h[*].mlp as m
save grad /h\.\d+/@1:out.0[..., 0:4:$s]
set h.{0,5}.*[2:]@0:in.hidden_states[{1,2}] = -(1.5 + $a) / @m - zeros * mean
set x[$i, 1] = 0
set <grad>.y:in[0] = 1
patch h[1].mlp from clean with $f
steer h[0] += $g(value, 2)
steer h[-1].mlp *= 2
prune fc.weight 50% by random(3) along 0
prune fc.weight 10 by magnitude
prune /weight$/ 5% by $scores
rule features[0] = alpha_beta(2, 1, 1e-6)
stop h[0]
"""


def _named_rules():
    names = set()
    for rule in lark_parser().rules:
        inlined = rule.options.expand1 and rule.alias is None
        if rule.origin.name.startswith("_") or inlined:
            continue
        names.add(rule.alias or rule.origin.name)
    return names


def test_every_rule_maps_to_an_ast_class():
    rules = _named_rules()
    assert rules == set(RULE_TO_AST), "grammar rules and RULE_TO_AST disagree"
    for name in rules:
        assert callable(getattr(_ToAst, name, None)), f"no transformer method for rule {name!r}"


def test_every_ast_class_comes_from_a_rule():
    node_classes = {
        cls for cls in vars(ast).values() if isinstance(cls, type) and issubclass(cls, ast.Node) and cls is not ast.Node
    }
    assert node_classes == set(RULE_TO_AST.values())


def test_each_rule_produces_its_class():
    tree = lark_parser().parse(EVERY_RULE, start="program")
    seen = {t.data for t in tree.iter_subtrees()}
    assert seen == _named_rules(), f"sample misses rules: {_named_rules() - seen}"

    for subtree in tree.iter_subtrees():
        produced = _ToAst().transform(subtree)
        assert isinstance(produced, RULE_TO_AST[subtree.data]), subtree.data
