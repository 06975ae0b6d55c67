"""Hypothesis strategies for tdhook_fx programs, and the equivalence check, for any test suite.

- `programs()` draws any well-formed program (an AST in canonical form, so
  `parse(str(p)) == p`); `program_texts()` draws its text.
- `programs_for(sites)` draws valid programs over one model's real sites (from
  `tdhook_fx.sites(model, example=...)`), with the runtime values they need.
- `inputs_like(example)` draws new model inputs shaped like the example's.
- `assert_equivalent(model, program, example, ...)` compiles a program and checks every output
  and saved value against the hook-based reference (`tdhook_fx.reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
try:
    from hypothesis import strategies as st
except ImportError:  # an optional part: its extra installs hypothesis
    raise ImportError("tdhook_fx.testing needs hypothesis: pip install 'tdhook_fx[testing]'") from None

from tdhook_fx.compiler.shapes import broadcasts_to, indexed_shape
from tdhook_fx.errors import InvalidPattern, MissingInputKey
from tdhook_fx.syntax import ast
from tdhook_fx.syntax.regex import compile_pattern

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
        compile_pattern(pattern)
    except InvalidPattern:
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
        st.just(ast.SiteValue()),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(ast.BinOp, st.sampled_from(["+", "-", "*", "/"]), inner, inner),
            inner.map(ast.Neg),
            st.builds(ast.Call, variables, st.lists(inner, max_size=3).map(tuple)),
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
    st.builds(ast.Patch, sites(), st.one_of(st.none(), identifiers), st.one_of(st.none(), variables)),
    st.builds(ast.Steer, sites(), st.sampled_from(["+=", "-=", "*="]), expressions()),
    st.builds(ast.Prune, parameter_paths, amounts, criteria, st.one_of(st.none(), st.integers(-3, 3))),
    st.builds(ast.Stop, sites()),
    st.builds(
        ast.Rule,
        sites(),
        identifiers,
        st.lists(st.one_of(st.integers(0, 10), st.floats(0, 10, allow_nan=False, allow_infinity=False)), max_size=3).map(tuple),
    ),
)


def programs(max_statements: int = 6):
    """Any well-formed program, as an AST in canonical form."""
    return st.lists(statements, max_size=max_statements).map(lambda s: ast.Program(tuple(s)))


def program_texts(max_statements: int = 6):
    """The canonical text of any well-formed program."""
    return programs(max_statements).map(str)


# ---- programs over a model's real sites -------------------------------------------------------


@dataclass(frozen=True)
class DrawnProgram:
    """A valid program over a model's sites, and the runtime values it needs."""

    text: str
    values: dict = field(default_factory=dict)
    patches: bool = False

    def __repr__(self) -> str:
        shapes = {k: getattr(v, "shape", v) for k, v in self.values.items()}
        return f"DrawnProgram(\n{self.text}\n, values={shapes})"


def _index_for(draw, shape) -> str:
    """A valid tensor index for `shape`, written in the DSL (or '' for none)."""
    if not shape or not draw(st.booleans()):
        return ""
    dim = draw(st.integers(0, len(shape) - 1))
    size = shape[dim]
    if draw(st.booleans()):
        entry = str(draw(st.integers(-size, size - 1)))
    else:
        start = draw(st.integers(0, size - 1))
        entry = f"{start}:{draw(st.integers(start + 1, size))}"
    if dim == len(shape) - 1 and len(shape) > 1:
        return f"[..., {entry}]"
    return "[" + ", ".join([":"] * dim + [entry]) + (", ..." if dim < len(shape) - 1 else "") + "]"


def _region(shape, index_text: str):
    if not index_text:
        return tuple(shape)
    items = []
    for part in index_text[1:-1].split(", "):
        if part == "...":
            items.append(Ellipsis)
        elif part == ":":
            items.append(slice(None))
        elif ":" in part:
            a, b = part.split(":")
            items.append(slice(int(a), int(b)))
        else:
            items.append(int(part))
    return tuple(indexed_shape(shape, tuple(items)))


@st.composite
def programs_for(
    draw, sites, max_statements: int = 5, allow_patch: bool = True, seed_values: int = 0, grads: bool = False
) -> DrawnProgram:
    """A valid program over `sites` (a `tdhook_fx.sites(...)` table), with its runtime values.

    Draws save / set / steer / patch / prune statements and at most one final stop, each over
    a real site with indices and values that fit its shape, and `set`/`steer` on parameters
    (weight edits); with `grads`, also `save grad` and `set grad` statements (check those with
    `assert_equivalent(..., backward=...)`).
    """
    activations = sorted((s for s in sites if s.is_activation and s.eager), key=lambda s: s.order)
    floats = [s for s in activations if s.dtype.is_floating_point and s.shape]
    parameters = [s for s in sites if s.kind == "param" and s.dtype.is_floating_point and s.shape]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)) + seed_values)
    lines: list[str] = []
    values: dict[str, torch.Tensor] = {}
    saved: list[tuple[str, object, tuple]] = []  # (name, site, shape)
    grad_defaults: set[str] = set()  # default names of saved gradients drawn so far
    patches = False
    count = draw(st.integers(1, max_statements))
    kinds = ["save", "set", "steer", "prune", "edit"] + (["patch"] if allow_patch else []) + (["save_grad", "set_grad"] if grads else [])
    edited: set[str] = set()  # parameters edited so far (a prune must come before an edit)
    for number in range(count):
        kind = draw(st.sampled_from(kinds)) if floats else "save"
        if kind == "edit" and parameters:
            site = draw(st.sampled_from(parameters))
            edited.add(site.name)
            lines.append(draw(_parameter_edit(site, values, generator, f"v{number}")))
            continue
        prunable = [p for p in parameters if p.name not in edited]
        if kind == "prune" and prunable:
            site = draw(st.sampled_from(prunable))
            amount = draw(st.sampled_from([f"{draw(st.integers(0, 100))}%", str(draw(st.integers(0, min(5, math.prod(site.shape)))))]))
            criterion = draw(st.sampled_from(["", " by magnitude", f" by random({draw(st.integers(0, 99))})"]))
            along = f" along {draw(st.integers(0, len(site.shape) - 1))}" if len(site.shape) > 1 and draw(st.booleans()) else ""
            if along and not amount.endswith("%"):
                amount = str(min(int(amount), site.shape[int(along.split()[-1])]))
            lines.append(f"prune {site.name} {amount}{criterion}{along}")
            continue
        site = draw(st.sampled_from(floats if kind != "save" else activations))
        index = _index_for(draw, site.shape)
        region = _region(site.shape, index)
        if kind == "save":
            name = f"s{number}"
            lines.append(f"save {site.name}{index} as {name}")
            saved.append((name, site, region))
            continue
        if kind == "patch":
            patches = True
            lines.append(f"patch {site.name}{index}")
            continue
        if kind == "save_grad":
            default = f"{site.name}.grad" not in grad_defaults and draw(st.booleans())
            grad_defaults.add(f"{site.name}.grad" if default else "")
            lines.append(f"save grad {site.name}{index}" + ("" if default else f" as g{number}"))
            continue
        value = draw(_values(site, region, saved, values, generator, f"v{number}"))
        if kind == "set_grad":
            lines.append(f"set grad {site.name}{index} = {value}")
            continue
        op = "=" if kind == "set" else draw(st.sampled_from(["+=", "-=", "*="]))
        lines.append(f"{kind} {site.name}{index} {op} {value}")
    if draw(st.booleans()):
        last = max((s for s in activations if any(_mentions(l, s.name) for l in lines)), key=lambda s: s.order, default=None)
        if last is not None:
            lines.append(f"stop {last.name}")
    return DrawnProgram("\n".join(lines), values, patches)


def _mentions(line: str, name: str) -> bool:
    words = [w for w in line.split() if w != "grad"]
    return len(words) > 1 and words[0] != "prune" and words[1].split("[")[0] == name


def doubled_in_place(x: torch.Tensor) -> torch.Tensor:
    """A bound function that changes its argument in place (`$f` gets a copy: nothing else changes)."""
    return x.mul_(2)


@st.composite
def _parameter_edit(draw, site, values, generator, var_name) -> str:
    """`set PARAM[INDEX] = EXPR` or `steer PARAM[INDEX] op EXPR` (numbers, runtime values, the weight)."""
    index = _index_for(draw, site.shape)
    region = _region(site.shape, index)
    choice = draw(st.sampled_from(["number", "var", "scaled var", "value", "zeros"]))
    if choice == "number":
        value = repr(draw(st.sampled_from([0, 1, 0.5, -2])))
    elif choice == "value":
        value = draw(st.sampled_from(["value * 0.5", "-value"]))
    elif choice == "zeros":
        value = "zeros"
    else:
        values[var_name] = torch.randn(draw(st.sampled_from([(), region])), generator=generator)
        value = f"${var_name}"
        if choice == "scaled var":  # a task vector and its scale: `steer W += $alpha * $tau`
            values[f"{var_name}_alpha"] = torch.randn((), generator=generator)
            value = f"${var_name}_alpha * ${var_name}"
    op = draw(st.sampled_from(["=", "+=", "-=", "*="]))
    return f"{'set' if op == '=' else 'steer'} {site.name}{index} {op} {value}"


@st.composite
def _values(draw, site, region, saved, values, generator, var_name) -> str:
    options = ["number", "zeros", "mean", "var", "value", "function"]
    earlier = [name for name, other, shape in saved if other.order <= site.order and broadcasts_to(shape, region) and other.dtype == site.dtype]
    if earlier:
        options.append("saved")
    choice = draw(st.sampled_from(options))
    if choice == "number":
        return repr(draw(st.sampled_from([0, 1, 2, 0.5, 1.5, 3.25])))
    if choice == "zeros":
        return draw(st.sampled_from(["zeros", "zeros + 1"]))
    if choice == "mean":
        return "mean"
    if choice == "value":
        return draw(st.sampled_from(["value * 0.5", "-value", "value + 1"]))
    if choice == "function":
        values[var_name] = draw(st.sampled_from([torch.tanh, doubled_in_place]))
        return f"${var_name}(value)"
    if choice == "saved":
        return "@" + draw(st.sampled_from(earlier)) + draw(st.sampled_from(["", " * 0.5"]))
    shape = draw(st.sampled_from([(), region[-1:] if region else ()]))
    values[var_name] = torch.randn(shape, generator=generator)
    return f"${var_name}" + draw(st.sampled_from(["", " * 2", " - 1"]))


@st.composite
def inputs_like(draw, example, in_keys=None) -> tuple[torch.Tensor, ...]:
    """New model inputs with the shapes and dtypes of `example`'s (a TensorDict) at `in_keys`.

    Floating-point inputs are drawn from a normal distribution; integer inputs (token ids,
    masks) uniformly between the example's smallest and largest value, so ids stay in the
    vocabulary and an all-ones mask stays all ones.
    """
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    drawn = []
    for key in in_keys or ["input"]:
        x = example.get(key, None)
        if x is None:
            keys = sorted(map(str, example.keys(include_nested=True, leaves_only=True)))
            raise MissingInputKey(f"inputs_like: the example has no input at key {key!r}; its keys: {keys}")
        if x.is_floating_point():
            drawn.append(torch.randn(x.shape, generator=generator, dtype=x.dtype))
        else:
            low, high = int(x.min()), int(x.max())
            drawn.append(torch.randint(low, high + 1, x.shape, generator=generator, dtype=x.dtype))
    return tuple(drawn)


def assert_equivalent(
    model, program: str, example, *, in_keys=None, out_keys=None, values=None, sources=None, backward=None,
    inputs=None, rtol=1e-5, atol=1e-5,
):
    """Compile `program` and check outputs and saved values against the hook reference.

    The program is compiled on `example` and both sides run on `inputs` (a tuple of tensors in
    `in_keys` order; by default the example's own).

    `backward`: a function of the outputs (a dict keyed as `reference.run` returns them: out_key
    names and ("saved", name)) that returns a scalar. Given, gradients are checked too: each
    `save grad`, and the gradients of the floating-point inputs and of the parameters, which
    show every `set grad`.
    """
    import tdhook_fx
    from tdhook_fx import reference
    from tdhook_fx.compiler.compiled import GRAD_DELTA, SAVED

    compiled = tdhook_fx.compile(model, program, example=example, in_keys=in_keys, out_keys=out_keys)
    if values:
        compiled.bind(**values)
    inputs = inputs if inputs is not None else tuple(example.get(k) for k in compiled.in_keys)
    if backward is not None:
        inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)
    source_inputs = {name: tuple(given) for name, given in (sources or {}).items()}
    got = compiled(*inputs, **source_inputs)
    flat = {k: v for k, v in got.items() if k not in (SAVED, GRAD_DELTA)}
    flat.update({("saved", k): v for k, v in got.get("saved", {}).items()})
    if backward is not None:
        flat.update(_compiled_gradients(model, compiled, inputs, got.get(GRAD_DELTA, {}), backward(flat)))
    want = reference.run(
        model, program, inputs, in_keys=in_keys, out_keys=out_keys, values=values, sources=sources, backward=backward
    )
    assert set(flat) == set(want), f"compiled returns {sorted(map(str, flat))}, reference {sorted(map(str, want))}"
    for key, expected in want.items():
        torch.testing.assert_close(
            flat[key], expected, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}\nprogram:\n{program}"
        )
    return compiled


def _compiled_gradients(model, compiled, inputs, deltas: dict, loss) -> dict:
    """The gradients `reference.run(..., backward=)` reports, computed through the compiled graph."""
    from tdhook_fx.compiler.capture import key_name
    from tdhook_fx.compiler.graphs import fetch_attr

    floats = [(key_name(k), x) for k, x in zip(compiled.in_keys, inputs) if x.is_floating_point()]
    aliases: dict[int, list[str]] = {}  # tied weights: the graph may hold them under any of their names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    parameters = {}
    for name, parameter in model.named_parameters():
        found = (fetch_attr(compiled.graph_module, f"model.{alias}") for alias in aliases[id(parameter)])
        parameters[name] = next((p for p in found if p is not None), None)
    differentiable = {n: p for n, p in parameters.items() if isinstance(p, torch.Tensor) and p.requires_grad}
    wanted = [x for _, x in floats] + list(differentiable.values()) + list(deltas.values())
    loss = torch.as_tensor(loss)
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad else [None] * len(wanted)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
    result = {("grad", key): g for (key, _), g in zip(floats, grads)}
    by_name = dict(zip(differentiable, grads[len(floats) :]))
    for name, parameter in model.named_parameters():
        result[("param_grad", name)] = by_name.get(name, torch.zeros_like(parameter))
    result.update({("saved", name): g for name, g in zip(deltas, grads[len(floats) + len(differentiable) :])})
    return result
