"""Hostile programs and runtime values: each is refused with a located or named TdhookFxError
(never a hang, a RecursionError, a raw Python or torch error), or runs exactly as the reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx.errors import BindingError, LayoutWarning, ResolutionError, UnknownModulePath
from tdhook_fx.syntax import ast


@pytest.fixture
def mlp(samples):
    return samples("mlp")


def resolution_error(mlp, program) -> ResolutionError:
    with pytest.raises(ResolutionError) as caught:
        tdhook_fx.compile(mlp.model, program, example=mlp.example)
    return caught.value


def _first(error) -> tuple:
    (diagnostic,) = error.diagnostics
    return diagnostic.span.line, diagnostic.span.column, diagnostic.message, " ".join(diagnostic.hints)


# ---- regular expressions that backtrack ---------------------------------------------------------


class LongNames(nn.Module):
    """Module names of 40 characters: Python's re takes about 2**40 steps on /(.+)+Z/ for each."""

    def __init__(self):
        super().__init__()
        for letter in "abc":
            self.add_module(letter * 40, nn.Linear(4, 4))

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def test_a_backtracking_selector_matches_in_linear_time():
    # Before: re.search backtracked for hours on each name (no timed assertion: it hangs or it doesn't).
    model, x = LongNames(), torch.randn(2, 4)
    for program in ("save /(.+)+Z/", "prune /(.+)+Z/ 50%"):
        with pytest.raises(ResolutionError, match="matches no"):
            tdhook_fx.compile(model, program, example=x)
    assert tdhook_fx.compile(model, "save /^(a+)+$/", example=x).saved_names == ("a" * 40,)


def test_a_backtracking_key_pattern_matches_in_linear_time_with_tdhooks_rule():
    from tdhook_fx.methods.paths import match_modules

    model = LongNames()
    assert match_modules(model, model, "(.+)+Z") == []
    assert [r.key for r in match_modules(model, model, "(b+)+")] == ["b" * 40]  # re.match: anchored at the start
    assert [r.key for r in match_modules(model, model, "(a+)+$")] == ["a" * 40]


def test_a_key_pattern_beyond_linear_time_is_refused_with_the_reason():
    from tdhook_fx.methods.paths import match_modules

    model = LongNames()
    with pytest.raises(UnknownModulePath, match=r"(?s)cannot be matched in linear time.*backreferences"):
        match_modules(model, model, r"(a)\1")


def test_a_hand_built_selector_is_checked_too(mlp):
    program = ast.Program((ast.Save(ast.Site(ast.RegexPath(r"(\d)\1"))),))
    with pytest.raises(ResolutionError, match="cannot be matched in linear time"):
        tdhook_fx.compile(mlp.model, program, example=mlp.example)


# ---- depth ----------------------------------------------------------------------------------------


def test_a_hand_built_program_nested_too_deep_is_refused_not_a_recursion_error(mlp):
    value = ast.Var("v")
    for _ in range(5_000):
        value = ast.BinOp("+", value, ast.Number(1))
    program = ast.Program((ast.Steer(ast.Site(ast.Path((ast.Attr("0"),))), "+=", value),))
    with pytest.raises(ResolutionError, match=f"nested deeper than {ast.MAX_DEPTH} levels"):
        tdhook_fx.compile(mlp.model, program, example=mlp.example)


def test_ten_thousand_statements_compile(mlp):
    program = "steer 0 += 0.5\n" * 10_000
    cm = tdhook_fx.compile(mlp.model, program, example=mlp.example)
    want = reference.run(mlp.model, program, (mlp.example["input"],))
    torch.testing.assert_close(cm(mlp.example["input"])["output"], want["output"])


# ---- constants ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program, column, message, hint",
    [
        ("set 0 = 1/0", 9, "division by zero", "divisor cannot be 0"),
        ("steer 0 += $v / (2 - 2)", 12, "division by zero", "divisor cannot be 0"),
        ("set 0 = 1e308 * 10", 9, "overflows to inf", "finite number"),
        ("set 0 = (1e308 * 10) - (1e308 * 10)", 10, "overflows to inf", "finite number"),
        ("set 0 = 9223372036854775807 + 1", 9, "too large", "as a decimal"),
        ("set 0 = 1e300", 9, "does not fit 0, which holds float32 values", "float32's range"),
        ("steer 0 += $v * 1e39", 17, "does not fit 0, which holds float32 values", "float32's range"),
        ("steer 0 *= $f(1e308 * 10)", 15, "overflows to inf", "finite number"),
    ],
)
def test_constant_folding_faults_are_located_resolution_errors(mlp, program, column, message, hint):
    line, got_column, got_message, got_hint = _first(resolution_error(mlp, program))
    assert (line, got_column) == (1, column)
    assert message in got_message and hint in got_hint


def test_constants_that_fit_still_fold(mlp):
    program = "set 0 = 1e38 * 2 - 1e38 * 2 + 3 / 4"
    got = tdhook_fx.compile(mlp.model, program + "\nsave 0", example=mlp.example)(mlp.example["input"])
    assert torch.all(got["saved"]["0"] == 0.75)


def test_a_constant_out_of_an_integer_sites_range_is_refused():
    model, ids = nn.Sequential(nn.Embedding(10, 4)), torch.tensor([[1, 2]], dtype=torch.int32)
    with pytest.raises(ResolutionError, match="holds int32 values"):
        tdhook_fx.compile(model, "set 0:in.0 = 4294967296", example=ids)


# ---- slices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program, column, message",
    [
        ("set 0[:, ::0] = 1", 10, "a tensor slice needs a positive step, not 0"),
        ("set 0[:, ::-1] = 1", 10, "a tensor slice needs a positive step, not -1"),
        ("save 0[..., 1:3:-2]", 13, "a tensor slice needs a positive step, not -2"),
        ("save [::0]", 7, "a slice step cannot be 0"),
    ],
)
def test_slice_steps_that_torch_refuses_are_located_resolution_errors(mlp, program, column, message):
    line, got_column, got_message, _ = _first(resolution_error(mlp, program))
    assert (line, got_column) == (1, column) and got_message == message


def test_a_negative_step_still_selects_modules_as_a_list_does(mlp):
    cm = tdhook_fx.compile(mlp.model, "save [::-2]", example=mlp.example)
    assert set(cm.saved_names) == {"4", "2", "0"}


# ---- runtime positions and slice bounds ---------------------------------------------------------


@pytest.mark.parametrize(
    "pos, words",
    [
        (torch.tensor(16), "runtime position 16, out of range for dimension 1, of size 16"),
        (-17, "runtime position -17, out of range"),
        (torch.tensor([3, 40]), "runtime position 40, out of range"),
        (torch.tensor(True), "of dtype bool; positions are integers"),
        (1.0, "of dtype float32; positions are integers"),
    ],
)
@pytest.mark.parametrize("program", ["set 0[:, $pos] = 0", "save 0[..., $pos]", "steer 0[:, $pos] += 1", "patch 0[:, $pos]"])
def test_a_bad_runtime_position_is_a_binding_error_naming_the_statement(mlp, program, pos, words):
    cm = tdhook_fx.compile(mlp.model, program, example=mlp.example)
    x = mlp.example["input"]
    sources = {"patched": (x,)} if program.startswith("patch") else {}
    with pytest.raises(BindingError) as caught:
        cm(x, pos=pos, **sources)
    assert str(caught.value).startswith(program) and words in str(caught.value)


def test_a_bad_runtime_position_in_a_saved_gradient_is_a_binding_error(mlp):
    cm = tdhook_fx.compile(mlp.model, "save grad 0[:, $pos]", example=mlp.example)
    with pytest.raises(BindingError):
        cm(mlp.example["input"], pos=torch.tensor(True))
    with pytest.raises(BindingError):
        cm(mlp.example["input"], pos=99)


@pytest.mark.parametrize(
    "bounds, words",
    [
        ({"a": 0, "b": 4, "s": -1}, "the step of the slice in index entry 2 is -1"),
        ({"a": 0, "b": 4, "s": 0}, "the step of the slice in index entry 2 is 0"),
        ({"a": 0.5, "b": 4, "s": 1}, "the start of the slice in index entry 2 is a runtime value of shape () and dtype float32"),
        ({"a": 0, "b": torch.tensor([1, 2]), "s": 1}, "the stop of the slice in index entry 2 is a runtime value of shape (2,)"),
    ],
)
def test_bad_runtime_slice_bounds_are_binding_errors(mlp, bounds, words):
    cm = tdhook_fx.compile(mlp.model, "steer 0[:, $a:$b:$s] += 1", example=mlp.example)
    with pytest.raises(BindingError, match=words.replace("(", r"\(").replace(")", r"\)")):
        cm(mlp.example["input"], **bounds)


def test_good_runtime_positions_and_bounds_still_equal_the_reference(mlp):
    x = mlp.example["input"]
    program = "steer 0[:, $a:$b:$s] += 1\nset 0[..., $pos] = 0\nsave 0"
    values = {"a": 1, "b": 9, "s": 3, "pos": torch.tensor([-1, 2])}
    want = reference.run(mlp.model, program, (x,), values=values)
    got = tdhook_fx.compile(mlp.model, program, example=mlp.example)(x, **values)
    torch.testing.assert_close(got["saved"]["0"], want[("saved", "0")])


# ---- bind and runtime values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, words",
    [
        ("abc", "$v cannot be 'abc' (of type str)"),
        (None, "$v cannot be None (of type NoneType)"),
        (2**70, "$v cannot be 1180591620717411303424 (of type int)"),
        (torch.empty(16, device="meta"), "$v is a meta tensor of shape (16,)"),
    ],
)
def test_bind_refuses_what_is_no_runtime_value_naming_it(mlp, value, words):
    cm = tdhook_fx.compile(mlp.model, "steer 0 += $v", example=mlp.example)
    with pytest.raises(BindingError) as caught:
        cm.bind(v=value)
    assert str(caught.value).startswith(words)
    assert "v" not in cm.bound_values()


def test_a_value_given_per_call_is_checked_as_bind_checks_it(mlp):
    cm = tdhook_fx.compile(mlp.model, "steer 0 += $v", example=mlp.example)
    with pytest.raises(BindingError, match="is a meta tensor"):
        cm(mlp.example["input"], v=torch.empty(16, device="meta"))
    td = mlp.example.clone()
    td["v"] = torch.empty(4, 16, device="meta")
    with pytest.raises(BindingError, match="is a meta tensor"):
        cm(td)


def test_bind_checks_every_value_before_binding_any(mlp):
    cm = tdhook_fx.compile(mlp.model, "steer 0 += $alpha * $v", example=mlp.example)
    with pytest.raises(BindingError):
        cm.bind(alpha=2.0, v="abc")
    assert cm.bound_values() == {}


def test_the_later_bind_wins_between_a_function_and_a_tensor(mlp):
    x = mlp.example["input"]
    cm = tdhook_fx.compile(mlp.model, "steer 0 += $v(value)", example=mlp.example)
    tdhook_fx.compile(mlp.model, "steer 0 += $v", example=mlp.example)
    steer = tdhook_fx.compile(mlp.model, "steer 0 += $v", example=mlp.example)
    steer.bind(v=torch.tanh)
    steer.bind(v=torch.ones(16))
    torch.testing.assert_close(
        steer(x)["output"], reference.run(mlp.model, "steer 0 += $v", (x,), values={"v": torch.ones(16)})["output"]
    )
    assert "bound_v" in dict(steer.named_buffers())
    cm.bind(v=torch.ones(16))
    cm.bind(v=torch.tanh)
    assert "bound_v" not in dict(cm.named_buffers()) and cm.bound_values() == {"v": torch.tanh}
    torch.testing.assert_close(
        cm(x)["output"], reference.run(mlp.model, "steer 0 += $v(value)", (x,), values={"v": torch.tanh})["output"]
    )


def test_a_fractional_runtime_value_at_an_integer_site_is_refused():
    model, ids = nn.Sequential(nn.Embedding(10, 4)), torch.tensor([[1, 2, 3]])
    cm = tdhook_fx.compile(model, "set 0:in.0 = $d\nsave 0:in.0 as ids", example=ids)
    with pytest.raises(BindingError, match="dtype float32 cannot go into 0:in.input, which holds int64 values"):
        cm(ids, d=torch.tensor(1.7))
    with pytest.raises(BindingError, match="cut its fractions off"):
        cm(ids, d=1.0)
    assert cm(ids, d=2)["saved"]["ids"].tolist() == [[2, 2, 2]]


# ---- layout of runtime values -------------------------------------------------------------------


def _square():
    model = nn.Sequential(nn.Linear(3, 3))
    return model, TensorDict(input=torch.randn(3, 3), batch_size=[3])


def test_a_batch_sized_value_that_broadcasts_along_the_features_warns():
    model, td = _square()
    cm = tdhook_fx.compile(model, "steer 0 += $v", example=td)
    td["v"] = torch.tensor([1.0, 2.0, 3.0])  # one per example, says the TensorDict; torch adds it per feature
    with pytest.warns(LayoutWarning, match=r"(?s)broadcasts along the site's last 1 dimension.*shape \(3, 1\)"):
        cm(td)


@pytest.mark.parametrize("shape", [(3, 1), (1, 3), (3, 3), ()])
def test_values_with_the_sites_rank_or_no_batch_size_do_not_warn(shape):
    model, td = _square()
    cm = tdhook_fx.compile(model, "steer 0 += $v", example=td)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        cm(td["input"], v=torch.ones(shape))
        cm(torch.randn(2, 3), v=torch.ones(3))  # width 3, batch 2: not the batch size


# ---- bound functions that change their input in place -------------------------------------------


def doubled_in_place(x, *others):
    return x.mul_(2) + sum(others)  # others: the source value of `patch ... with $f`


@pytest.mark.parametrize(
    "program",
    [
        "save 0 as before\nset 0 = $f(value)\nsave 0 as after",
        "save 0 as before\nsteer 0 += $f(value)\nsave 0 as after",
        "save 0[:, 1:3] as before\nset 0[:, 1:3] = $f(value)\nsave 0 as after",
        "save 0 as before\npatch 0 with $f\nsave 0 as after",
        "save 0 as before\nset 0 = $f(@before)\nsave 2 as after",
    ],
)
def test_a_function_that_changes_its_input_in_place_changes_nothing_else(mlp, program):
    x = mlp.example["input"]
    values, sources = {"f": doubled_in_place}, ({"patched": (x * 3,)} if "patch" in program else {})
    want = reference.run(mlp.model, program, (x,), values=values, sources=sources)
    got = tdhook_fx.compile(mlp.model, program, example=mlp.example)(x, **values, **sources)
    for name in ("before", "after"):
        torch.testing.assert_close(got["saved"][name], want[("saved", name)])
    torch.testing.assert_close(got["output"], want["output"])


# ---- keys that are no Python names --------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.a(x) + y


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("key", ["__debug__", "self", "torch", "getattr", "²", "x y", "", "0", "tdhook_fx_compiler_passes_ops_fit"])
def test_any_in_key_gives_a_valid_forward(frontend, key):
    model = TwoInputs()
    td = TensorDict({key: torch.randn(2, 4), "y": torch.randn(2, 4)}, batch_size=[2])
    td["v"] = torch.ones(2, 4)
    cm = tdhook_fx.compile(model, "steer a += $v\nsave a", example=td, in_keys=[key, "y"], frontend=frontend)
    out = cm(td)
    torch.testing.assert_close(out["saved", "a"], model.a(td[key]) + 1)
    torch.testing.assert_close(out["output"], model.a(td[key]) + 1 + td["y"])


def test_python_names_refuse_nothing_and_never_collide():
    from tdhook_fx.compiler.capture.call_plan import python_name

    taken: list[str] = []
    for text in ["__debug_", "__debug_", "self", "a.b", "a_b", "", "9", "é", "²", "torch", "input", "input"]:
        name = python_name(text, taken)
        assert name.isidentifier() and name not in taken
        compile(f"def forward(self, {', '.join(taken + [name])}): pass", "<test>", "exec")
        taken.append(name)
    assert python_name("input") == "input" and python_name("input_ids") == "input_ids"  # readable as before
