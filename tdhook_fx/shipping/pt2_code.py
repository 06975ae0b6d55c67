"""The strings of a `.pt2` graph that torch turns into code, and the grammar accepted for each.

torch 2.13's deserializer (`torch/_export/serde/serialize.py`) and `ExportedProgram.module()`
(`torch/export/_unlift.py`) turn three kinds of strings into code:

- a node's `target` is resolved by `getattr` from `torch`, `math` or `_operator`: any callable
  there (`torch.os.system`) is called when the graph runs. Accepted: the symbolic-size operators
  torch itself serializes, and ATen operators (`torch.ops.aten`, registered with the dispatcher)
  whose schema takes only tensors, numbers, dtypes, devices and layouts (a string argument only
  where it names a mode: `gelu(approximate=...)`) and that return a value (or only assert).
  That excludes `aten::from_file` (maps and creates files), TorchScript builtins such as
  `aten::save` and `aten::manual_seed`, and side-effect-only operators (`aten::_backward`).
- every `expr_str` goes through `sympy.sympify`, which `eval`s it, and evaluates integer powers
  at once (`10**10**8` never returns). Accepted: the `srepr` form torch writes
  (`Mul(Integer(32), Symbol('s70', positive=True, integer=True))`): calls of a fixed set of
  sympy constructors on integer literals of at most 20 digits and symbol names; a power only
  with a literal exponent of at most 16 and a base without powers; at most 2000 characters.
- each of `guards_code` is pasted into the source of a function that runs on every call, once
  inside a double-quoted string. Accepted: comparisons, `and`/`or`/`not`, `+ - * // %` of
  integer literals and `L['name'].size()[i]` (also `.stride()[i]`, `.storage_offset()`) where
  `name` is one of the program's inputs.
"""

from __future__ import annotations

import ast
import functools
import re

import torch

MAX_EXPRESSION = 2000  # characters of one symbolic expression
MAX_DIGITS = 20  # of an integer literal in an expression or a guard
MAX_EXPONENT = 16
MAX_GUARD = 1000  # characters of one guard

# ---- call targets -------------------------------------------------------------------------------

SYMBOLIC_TARGETS = frozenset(
    {
        *(
            f"_operator.{name}"
            for name in (
                "eq",
                "ne",
                "le",
                "ge",
                "lt",
                "gt",
                "neg",
                "pos",
                "mul",
                "add",
                "sub",
                "floordiv",
                "mod",
                "truediv",
                "and_",
                "or_",
            )
        ),
        "math.trunc",
        *(
            f"torch.{name}"
            for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")
        ),
    }
)
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_VALUE_TYPES = frozenset(
    {
        "Tensor",
        "int",
        "bool",
        "float",
        "number",
        "complex",
        "ScalarType",
        "Layout",
        "Device",
        "MemoryFormat",
        "Generator",
    }
)
_ASSERTIONS = frozenset(
    {  # operators run for their effect, which is only to fail on bad inputs
        "_assert_tensor_metadata",
        "_assert_scalar",
        "_assert_async",
        "_functional_assert_async",
        "_functional_assert_scalar",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
    }
)
_MODE_ARGUMENTS = frozenset(
    {  # string arguments that only name a mode of the computation
        "approximate",
        "assert_msg",
        "driver",
        "equation",
        "indexing",
        "interpolation",
        "mode",
        "norm",
        "ord",
        "p",
        "pad_mode",
        "padding",
        "padding_side",
        "reduce",
        "rounding_mode",
        "side",
        "UPLO",
    }
)


def target_problem(target: str) -> str | None:
    """Why a node's call target is refused, or None when it is an accepted operator."""
    if target in SYMBOLIC_TARGETS:
        return None
    match = _ATEN_TARGET.fullmatch(target)
    if match is None:
        return "is not an aten operator (torch would look it up as any attribute of torch, math or operator)"
    return _aten_problem(*match.groups())


@functools.lru_cache(maxsize=4096)
def _aten_problem(name: str, overload: str) -> str | None:
    wanted = "" if overload == "default" else overload
    schemas = [
        s for s in torch._C._jit_get_schemas_for_operator(f"aten::{name}") if s.overload_name == wanted
    ]
    if not schemas:
        return "is not a registered aten operator"
    try:  # TorchScript's builtins (aten::save, aten::manual_seed) are not dispatcher operators
        torch._C._dispatch_find_schema_or_throw(f"aten::{name}", wanted)
    except RuntimeError:
        return "is a TorchScript builtin, not an ATen operator"
    schema = schemas[0]
    if not schema.returns and name not in _ASSERTIONS:
        return "returns nothing (it runs only for its side effects)"
    for argument in schema.arguments:
        kind = str(argument.real_type)
        if kind in ("str", "Optional[str]") and argument.name in _MODE_ARGUMENTS:
            continue
        if not _value_type(kind):
            return f"takes {argument.name}: {kind} (it could reach outside the computation)"
    for returned in schema.returns:
        if not _value_type(str(returned.real_type)):
            return f"returns {returned.real_type}"
    return None


def _value_type(kind: str) -> bool:
    """Tensor, int, ... or an Optional / List of them."""
    while kind.startswith(("Optional[", "List[")) and kind.endswith("]"):
        kind = kind[kind.index("[") + 1 : -1]
    return kind in _VALUE_TYPES


# ---- symbolic expressions (sympify) -------------------------------------------------------------

_EXPRESSION_CHARACTERS = re.compile(r"[A-Za-z0-9_(), '=\-]*")
SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_SYMBOL_FLAGS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero"}
)
_ARITY = {  # sympy (and torch.utils._sympy) constructors and their numbers of arguments
    **dict.fromkeys(("Add", "Mul", "Min", "Max", "And", "Or"), (2, None)),
    **dict.fromkeys(
        (
            "FloorDiv",
            "Mod",
            "PythonMod",
            "CleanDiv",
            "CeilDiv",
            "Eq",
            "Ne",
            "Lt",
            "Le",
            "Gt",
            "Ge",
            "StrictLessThan",
            "StrictGreaterThan",
            "LessThan",
            "GreaterThan",
            "Equality",
            "Unequality",
            "Rational",
        ),
        (2, 2),
    ),
    **dict.fromkeys(("Not", "FloorToInt", "CeilToInt", "TruncToInt", "Identity"), (1, 1)),
    "ModularIndexing": (3, 3),
}
_CONSTANTS = frozenset({"true", "false"})


def expression_problem(text: str) -> str | None:
    """Why a symbolic expression is refused, or None when it is in the accepted grammar."""
    tree = _parsed(text, MAX_EXPRESSION, _EXPRESSION_CHARACTERS, "the sympy constructors torch writes")
    return tree if isinstance(tree, str) else _sympy_problem(tree, inside_power=False)


def _parsed(text: str, longest: int, characters, allowed: str) -> ast.expr | str:
    """The expression `text` parsed (never run), or why it is refused before parsing: too long,
    characters outside `characters`, or no expression."""
    if len(text) > longest:
        return f"is {len(text)} characters long (at most {longest})"
    if not characters.fullmatch(text):
        return f"has characters outside {allowed}"
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, MemoryError, RecursionError):
        return "does not parse"


def _sympy_problem(node, inside_power: bool) -> str | None:
    if isinstance(node, ast.Name):
        return None if node.id in _CONSTANTS else f"names {node.id!r}"
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return "is not a call of a sympy constructor"
    name, args = node.func.id, node.args
    if name == "Integer":
        return (
            None
            if len(args) == 1 and not node.keywords and _literal(args[0]) is not None
            else "has a malformed Integer"
        )
    if name == "Symbol":
        return _symbol_problem(node)
    if node.keywords:
        return f"passes keywords to {name}"
    if name == "Pow":
        if inside_power:
            return "raises a power to a power"
        if len(args) != 2 or _integer(args[1]) is None or abs(_integer(args[1])) > MAX_EXPONENT:
            return f"has a power whose exponent is not an Integer of at most {MAX_EXPONENT}"
        return _sympy_problem(args[0], inside_power=True)
    if name == "Rational":
        return (
            None
            if len(args) == 2 and all(_literal(a) is not None for a in args)
            else "has a malformed Rational"
        )
    if name not in _ARITY:
        return f"calls {name!r}"
    low, high = _ARITY[name]
    if len(args) < low or (high is not None and len(args) > high):
        return f"calls {name} with {len(args)} arguments"
    for arg in args:
        problem = _sympy_problem(arg, inside_power)
        if problem:
            return problem
    return None


def _symbol_problem(node: ast.Call) -> str | None:
    if (
        len(node.args) != 1
        or not isinstance(node.args[0], ast.Constant)
        or not isinstance(node.args[0].value, str)
    ):
        return "has a malformed Symbol"
    if not SYMBOL_NAME.fullmatch(node.args[0].value):
        return f"has a symbol named {node.args[0].value!r}"
    for keyword in node.keywords:
        value = keyword.value
        if (
            keyword.arg not in _SYMBOL_FLAGS
            or not isinstance(value, ast.Constant)
            or type(value.value) is not bool
        ):
            return "has a Symbol with an unexpected assumption"
    return None


def _integer(node) -> int | None:
    """The value of `Integer(n)`."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Integer"
        and len(node.args) == 1
    ):
        return _literal(node.args[0])
    return None


def _literal(node) -> int | None:
    """An integer literal (`-32` included) of at most MAX_DIGITS digits."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    if negative:
        node = node.operand
    if not isinstance(node, ast.Constant) or type(node.value) is not int or len(str(node.value)) > MAX_DIGITS:
        return None
    return -node.value if negative else node.value


# ---- guards (Python run on every call) ----------------------------------------------------------

_GUARD_CHARACTERS = re.compile(r"[A-Za-z0-9_()\[\]' .<>=!+\-*/%]*")
_TENSOR_METHODS = {"size", "stride"}


def guard_problem(code: str, input_names: set[str]) -> str | None:
    """Why a guard is refused, or None when it is a plain check of `input_names`' sizes."""
    tree = _parsed(code, MAX_GUARD, _GUARD_CHARACTERS, "plain size checks")
    if isinstance(tree, str):
        return tree
    return None if _plain_guard(tree, input_names) else "is not a plain check of the inputs' sizes"


def _plain_guard(node, inputs: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) is bool or (type(node.value) is int and len(str(node.value)) <= MAX_DIGITS)
    if isinstance(node, ast.Compare):
        return _plain_guard(node.left, inputs) and all(_plain_guard(c, inputs) for c in node.comparators)
    if isinstance(node, ast.BoolOp):
        return all(_plain_guard(v, inputs) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.Not, ast.USub)) and _plain_guard(node.operand, inputs)
    if isinstance(node, ast.BinOp):
        arithmetic = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
        return (
            isinstance(node.op, arithmetic)
            and _plain_guard(node.left, inputs)
            and _plain_guard(node.right, inputs)
        )
    if isinstance(node, ast.Subscript):  # L['x'].size()[0]
        index = node.slice
        return isinstance(index, ast.Constant) and type(index.value) is int and _size_call(node.value, inputs)
    if isinstance(node, ast.Call):  # L['x'].storage_offset()
        function = node.func
        return (
            isinstance(function, ast.Attribute)
            and function.attr == "storage_offset"
            and not node.args
            and not node.keywords
            and _input(function.value, inputs)
        )
    return False


def _size_call(node, inputs: set[str]) -> bool:
    return (
        isinstance(node, ast.Call)
        and not node.args
        and not node.keywords
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _TENSOR_METHODS
        and _input(node.func.value, inputs)
    )


def _input(node, inputs: set[str]) -> bool:
    """`L['name']` for one of the program's inputs."""
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "L"
        and isinstance(node.slice, ast.Constant)
        and node.slice.value in inputs
    )
