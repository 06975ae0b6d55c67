"""Exactly what `cm.export` writes into a `.pt2` (torch 2.13's format), as allow-lists.

The entries (relative to the archive's one root folder; names compared exactly, while torch's
reader ignores letter case), and what each may hold:

    archive_format, archive_version, byteorder,     the format's markers, exact values
    .data/version, .data/serialization_id
    models/model.json                               the graph (GRAPH below)
    data/weights/model_weights_config.json          where each weight's bytes are (WEIGHTS)
    data/weights/weight_<n>                         raw tensor bytes
    data/constants/model_constants_config.json      the same for constants (CONSTANTS)
    data/constants/tensor_<n>                       raw tensor bytes
    data/sample_inputs/model.pt                     empty (cm.export saves no example inputs)
    extra/tdhook_fx.json                            the manifest (MANIFEST)

The graph's schema follows `torch/_export/serde/schema.py`, reduced to the variants an export of
a compiled module uses: no subgraphs, custom objects, operator arguments, extension operators
or node metadata beyond stack traces and module paths; strings that torch turns into code are
checked by `pt2_code`. `check_storage` and `check_against_manifest` check what no single field
shows: that every weight's bytes are all there, and that the graph's inputs, outputs, runtime
buffers and pytree specs are the ones the manifest names.
"""

from __future__ import annotations

import json
import re

from torch.utils import _pytree as pytree

from tdhook_fx.errors import CodeInFile, PickleInFile
from tdhook_fx.shipping.pt2_code import (
    MAX_EXPRESSION,
    SYMBOL_NAME,
    expression_problem,
    guard_problem,
    target_problem,
)
from tdhook_fx.shipping.schema import (
    Invalid,
    both,
    const,
    flag,
    items,
    nullable,
    one_of,
    parse_json,
    real,
    record,
    shown,
    table,
    text,
    whole,
)

GRAPH_ENTRY = "models/model.json"
WEIGHTS_CONFIG_ENTRY = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG_ENTRY = "data/constants/model_constants_config.json"
SAMPLE_INPUTS_ENTRY = "data/sample_inputs/model.pt"
MANIFEST_ENTRY = "extra/tdhook_fx.json"
FORMAT_ENTRIES = {  # exact contents
    "archive_format": re.compile(rb"pt2"),
    "archive_version": re.compile(rb"0"),
    "byteorder": re.compile(rb"little"),
    ".data/version": re.compile(rb"[0-9]{1,3}\n"),
    ".data/serialization_id": re.compile(rb"[0-9]{1,64}"),
}
WEIGHT_ENTRY = re.compile(r"data/weights/(weight_(?:0|[1-9][0-9]{0,8}))")
CONSTANT_ENTRY = re.compile(r"data/constants/(tensor_(?:0|[1-9][0-9]{0,8}))")
# the largest each kind of entry may be, in bytes (tensor bytes: their declared sizes, see check_storage)
LIMITS = {"graph": 32 << 20, "config": 16 << 20, "manifest": 4 << 20, "format": 64, "empty": 0}
MAX_EXPRESSIONS = 100_000  # symbolic expressions in one graph (each costs torch a sympify at load)


def entry_kind(name: str) -> str | None:
    """The kind of an entry cm.export writes (graph, config, manifest, tensor bytes, empty, format), or None."""
    if name == GRAPH_ENTRY:
        return "graph"
    if name in (WEIGHTS_CONFIG_ENTRY, CONSTANTS_CONFIG_ENTRY):
        return "config"
    if name == MANIFEST_ENTRY:
        return "manifest"
    if name == SAMPLE_INPUTS_ENTRY:
        return "empty"
    if name in FORMAT_ENTRIES:
        return "format"
    if WEIGHT_ENTRY.fullmatch(name) or CONSTANT_ENTRY.fullmatch(name):
        return "tensor bytes"
    return None


REQUIRED_ENTRIES = (
    GRAPH_ENTRY,
    WEIGHTS_CONFIG_ENTRY,
    CONSTANTS_CONFIG_ENTRY,
    SAMPLE_INPUTS_ENTRY,
    MANIFEST_ENTRY,
    *FORMAT_ENTRIES,
)

# ---- names --------------------------------------------------------------------------------------

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]{0,255}"
_PART = r"(?!__)[A-Za-z0-9_]{1,255}"  # a module or tensor name: no dunder (it would reach Python internals)
DOTTED = rf"{_PART}(?:\.{_PART}){{0,63}}"
NAME = text(max_length=256, pattern=IDENTIFIER)
FQN = text(max_length=4096, pattern=DOTTED)
KEY = text(max_length=1024)  # a TensorDict key or saved name, as text


def _not_pickled(value, where) -> None:
    if value is not False:
        raise PickleInFile(
            where, f"use_pickle is {shown(value)}: torch would torch.load(weights_only=False) the payload"
        )


def _expression(value, where) -> None:
    text(max_length=MAX_EXPRESSION)(value, where)
    problem = expression_problem(value)
    if problem:
        raise CodeInFile(where, f"symbolic expression {shown(value)} {problem} (sympify would eval it)")


def _target(value, where) -> None:
    text(max_length=256)(value, where)
    problem = target_problem(value)
    if problem:
        raise CodeInFile(
            where, f"call target {shown(value)} {problem}; it would be called when the graph runs"
        )


# ---- the graph (schema.py's dataclasses, as JSON) -----------------------------------------------

ELEMENT_SIZES = {  # ScalarType (schema.py) -> bytes per element
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 2,
    7: 4,
    8: 8,
    9: 4,
    10: 8,
    11: 16,
    12: 1,
    13: 2,
    28: 2,
    29: 1,
    30: 1,
    31: 1,
    32: 1,
    33: 1,
    34: 4,
    35: 8,
}
STRIDED = 7  # Layout.Strided
_SIZE = 1 << 62
DTYPE = const(*ELEMENT_SIZES)
DEVICE = record({"type": const("cpu", "cuda", "meta")}, {"index": nullable(whole(0, 1024))})
SYM_EXPR = record(
    {"expr_str": _expression},
    {"hint": nullable(one_of({"as_int": whole(), "as_bool": flag, "as_float": real}))},
)
SYM_INT = one_of({"as_expr": SYM_EXPR, "as_int": whole(-_SIZE, _SIZE)})
SYM_BOOL = one_of({"as_expr": SYM_EXPR, "as_bool": flag})
SYM_FLOAT = one_of({"as_expr": SYM_EXPR, "as_float": real})
TENSOR_META = record(
    {
        "dtype": DTYPE,
        "sizes": items(SYM_INT, 64),
        "requires_grad": flag,
        "device": DEVICE,
        "strides": items(SYM_INT, 64),
        "storage_offset": SYM_INT,
        "layout": const(STRIDED),
    }
)
TENSOR = record({"name": NAME})
SYM_INT_ARGUMENT = one_of({"as_name": NAME, "as_int": whole()})
SYM_FLOAT_ARGUMENT = one_of({"as_name": NAME, "as_float": real})
SYM_BOOL_ARGUMENT = one_of({"as_name": NAME, "as_bool": flag})
OPTIONAL_TENSOR = one_of({"as_tensor": TENSOR, "as_none": flag})
ARGUMENT = one_of(
    {
        "as_none": flag,
        "as_tensor": TENSOR,
        "as_tensors": items(TENSOR),
        "as_int": whole(),
        "as_ints": items(whole()),
        "as_float": real,
        "as_floats": items(real),
        "as_string": text(max_length=256),
        "as_sym_int": SYM_INT_ARGUMENT,
        "as_sym_ints": items(SYM_INT_ARGUMENT),
        "as_scalar_type": DTYPE,
        "as_memory_format": const(0, 1, 2, 3, 4),
        "as_layout": const(*range(8)),
        "as_device": DEVICE,
        "as_bool": flag,
        "as_bools": items(flag),
        "as_sym_bool": SYM_BOOL_ARGUMENT,
        "as_sym_bools": items(SYM_BOOL_ARGUMENT),
        "as_optional_tensors": items(OPTIONAL_TENSOR),
        "as_sym_float": SYM_FLOAT_ARGUMENT,
        "as_sym_floats": items(SYM_FLOAT_ARGUMENT),
        "as_optional_tensor": OPTIONAL_TENSOR,
        "as_complex": record({"real": real, "imag": real}),
        "as_nested_tensors": items(items(TENSOR)),
        "as_int_lists": items(items(whole())),
        "as_float_lists": items(items(real)),
    }
)
OUTPUT = one_of(
    {
        "as_tensor": TENSOR,
        "as_tensors": items(TENSOR),
        "as_none": flag,
        "as_sym_int": SYM_INT_ARGUMENT,
        "as_sym_bool": SYM_BOOL_ARGUMENT,
        "as_sym_float": SYM_FLOAT_ARGUMENT,
        "as_optional_tensors": items(OPTIONAL_TENSOR),
    }
)
NODE = record(
    {
        "target": _target,
        "inputs": items(record({"name": NAME, "arg": ARGUMENT}, {"kind": nullable(const(0, 1, 2))})),
        "outputs": items(OUTPUT),
        "metadata": record(
            {},
            {
                "stack_trace": text(newlines=True),
                "nn_module_stack": text(),
                "torch_fn": text(max_length=4096),
            },
        ),
    },
    {"is_hop_single_tensor_return": const(None), "name": nullable(NAME)},
)
GRAPH_TENSOR = one_of({"as_tensor": TENSOR})
_EMPTY = table(text(), text(), max_length=0)
SIGNATURE = record(
    {
        "input_specs": items(
            one_of(
                {
                    "user_input": record({"arg": GRAPH_TENSOR}),
                    "parameter": record({"arg": TENSOR, "parameter_name": FQN}),
                    "buffer": record({"arg": TENSOR, "buffer_name": FQN, "persistent": flag}),
                    "tensor_constant": record({"arg": TENSOR, "tensor_constant_name": FQN}),
                }
            )
        ),
        "output_specs": items(
            one_of(
                {
                    "user_output": record({"arg": GRAPH_TENSOR}),
                    "buffer_mutation": record({"arg": TENSOR, "buffer_name": FQN}),
                }
            )
        ),
    }
)
MODULE_CALL = record(
    {"fqn": both(text(max_length=4096), lambda v, w: v == "" or FQN(v, w))},
    {
        "signature": nullable(
            record(
                {
                    "inputs": items(ARGUMENT),
                    "outputs": items(ARGUMENT),
                    "in_spec": text(max_length=1 << 20),
                    "out_spec": text(max_length=1 << 20),
                },
                {"forward_arg_names": nullable(items(NAME))},
            )
        )
    },
)
GRAPH = record(
    {
        "graph_module": record(
            {
                "graph": record(
                    {
                        "inputs": items(GRAPH_TENSOR),
                        "outputs": items(GRAPH_TENSOR),
                        "nodes": items(NODE),
                        "tensor_values": table(NAME, TENSOR_META),
                        "sym_int_values": table(NAME, SYM_INT),
                        "sym_bool_values": table(NAME, SYM_BOOL),
                    },
                    {
                        "is_single_tensor_return": flag,
                        "custom_obj_values": _EMPTY,
                        "sym_float_values": table(NAME, SYM_FLOAT),
                    },
                ),
                "signature": SIGNATURE,
                "module_call_graph": items(MODULE_CALL),
            },
            {"metadata": _EMPTY, "treespec_namedtuple_fields": _EMPTY},
        ),
        "opset_version": record({"aten": whole(0, 1 << 20)}),
        "range_constraints": table(
            text(max_length=16, pattern=SYMBOL_NAME.pattern),
            record({"min_val": nullable(whole()), "max_val": nullable(whole())}),
        ),
        "schema_version": record({"major": const(8), "minor": whole(0, 1 << 20)}),
    },
    {
        "verifiers": items(const("TRAINING"), 1),
        "torch_version": text(max_length=64, pattern=r"[0-9A-Za-z.+_<=-]+"),
        "guards_code": items(text(max_length=1000), 10_000),
    },
)

# ---- weights and constants: where each tensor's bytes are ----------------------------------------

_CONCRETE = one_of({"as_int": whole(0, _SIZE)})
_STORED_META = record(
    {
        "dtype": DTYPE,
        "sizes": items(_CONCRETE, 64),
        "requires_grad": flag,
        "device": record({"type": const("cpu", "cuda")}, {"index": nullable(whole(0, 1024))}),
        "strides": items(_CONCRETE, 64),
        "storage_offset": _CONCRETE,
        "layout": const(STRIDED),
    }
)


def _payload_config(prefix: str):
    meta = record(
        {
            "path_name": text(max_length=32, pattern=rf"{prefix}_(?:0|[1-9][0-9]{{0,8}})"),
            "is_param": flag,
            "use_pickle": _not_pickled,
            "tensor_meta": _STORED_META,
        }
    )
    return record({"config": table(FQN, meta)})


WEIGHTS = _payload_config("weight")
CONSTANTS = _payload_config("tensor")

# ---- the manifest (export.py writes it) ---------------------------------------------------------

MANIFEST = record(
    {
        "program": text(max_length=1 << 20, newlines=True),
        "inputs": items(NAME, 1024),
        "in_keys": items(KEY, 1024),
        "out_keys": items(KEY, 1024),
        "saved": items(KEY, 1 << 16),
        "runtime": table(NAME, text(max_length=300, pattern=r"runtime\.[A-Za-z_][A-Za-z0-9_]*"), 1 << 16),
    }
)


def canonical(raw: bytes, spec, limit: int):
    """Parse `raw` (bounded), check it against `spec`; returns (value, its canonical JSON bytes)."""
    value = parse_json(raw, limit)
    spec(value, "")
    return value, json.dumps(value).encode()


def count_expressions(canonical_graph: bytes) -> int:
    """An upper bound on the symbolic expressions in a graph (from its canonical JSON)."""
    return canonical_graph.count(b'"expr_str"')


# ---- whole-archive checks -----------------------------------------------------------------------


def check_storage(config: dict, directory: str, sizes: dict[str, int]) -> list[str]:
    """Problems with where a config puts its tensors: every entry used, each view within its bytes.

    torch builds one tensor per entry from its bytes (or, for an empty entry, `torch.zeros` of
    the declared size: a 0-byte entry may not claim elements), then views it per tensor.
    """
    problems = []
    used: dict[str, int] = {}  # entry -> dtype of the tensor torch builds from it
    for fqn, payload in config["config"].items():
        meta = payload["tensor_meta"]
        entry = f"{directory}/{payload['path_name']}"
        if entry not in sizes:
            problems.append(f"{fqn!r} is stored in {entry}, which the archive does not have")
            continue
        dtype = used.setdefault(entry, meta["dtype"])
        if dtype != meta["dtype"]:
            problems.append(f"{fqn!r} reads {entry} as another dtype than the tensors before it")
            continue
        element = ELEMENT_SIZES[dtype]
        nbytes = sizes[entry]
        if nbytes % element:
            problems.append(f"{entry} holds {nbytes} bytes, not a whole number of {element}-byte elements")
            continue
        shape = [s["as_int"] for s in meta["sizes"]]
        strides = [s["as_int"] for s in meta["strides"]]
        if len(shape) != len(strides):
            problems.append(f"{fqn!r} has {len(shape)} sizes but {len(strides)} strides")
            continue
        if 0 in shape:
            continue
        span = meta["storage_offset"]["as_int"] + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
        if span > nbytes // element:
            problems.append(
                f"{fqn!r} claims {span} elements of {entry}, which holds {nbytes // element}"
                + (" (torch would allocate them as zeros)" if nbytes == 0 else "")
            )
    unused = sorted({n for n in sizes if n.startswith(directory + "/")} - set(used))
    problems.extend(f"{entry} is not used by {directory}'s config" for entry in unused)
    return problems


def check_against_manifest(
    graph: dict, weights: dict, constants: dict, manifest: dict
) -> tuple[list[str], list[str]]:
    """(problems, what was checked) comparing the graph's signature with the configs and the manifest."""
    module = graph["graph_module"]
    signature = module["signature"]
    problems: list[str] = []
    inputs = manifest["inputs"]
    kinds: dict[str, list] = {}
    for spec in signature["input_specs"]:
        ((kind, value),) = spec.items()
        kinds.setdefault(kind, []).append(value)
    outputs = [
        value for spec in signature["output_specs"] for kind, value in spec.items() if kind == "user_output"
    ]
    user_inputs = [value["arg"]["as_tensor"]["name"] for value in kinds.get("user_input", [])]
    if len(user_inputs) != len(inputs):
        problems.append(f"the graph takes {len(user_inputs)} inputs, the manifest names {len(inputs)}")
    wanted_outputs = len(manifest["out_keys"]) + len(manifest["saved"])
    if len(outputs) != wanted_outputs:
        problems.append(f"the graph returns {len(outputs)} values, the manifest names {wanted_outputs}")
    graph_inputs = [a["as_tensor"]["name"] for a in module["graph"]["inputs"]]
    spec_inputs = [_spec_name(value) for spec in signature["input_specs"] for value in spec.values()]
    if graph_inputs != spec_inputs:
        problems.append("the graph's inputs are not those of its signature")
    graph_outputs = [a["as_tensor"]["name"] for a in module["graph"]["outputs"]]
    spec_outputs = [_spec_name(value) for spec in signature["output_specs"] for value in spec.values()]
    if graph_outputs != spec_outputs:
        problems.append("the graph's outputs are not those of its signature")
    buffers = {b["buffer_name"]: b["persistent"] for b in kinds.get("buffer", [])}
    stored = {p["parameter_name"] for p in kinds.get("parameter", [])} | {
        n for n, keep in buffers.items() if keep
    }
    constant = {c["tensor_constant_name"] for c in kinds.get("tensor_constant", [])} | {
        n for n, keep in buffers.items() if not keep
    }
    for what, names, config in (("weights", stored, weights), ("constants", constant, constants)):
        if set(config["config"]) != names:
            extra = sorted(set(config["config"]) - names)[:3]
            missing = sorted(names - set(config["config"]))[:3]
            problems.append(
                f"the {what} config does not match the graph's signature (extra {extra}, missing {missing})"
            )
    for name, buffer in manifest["runtime"].items():
        if buffer != f"runtime.{name}":
            problems.append(
                f"the manifest's runtime value {name!r} names the buffer {buffer!r}, not 'runtime.{name}'"
            )
        elif buffer not in buffers:
            problems.append(f"the manifest's runtime buffer {buffer!r} is not a buffer of the graph")
    problems.extend(_check_calls(module["module_call_graph"], manifest))
    checked = [
        f"inputs ({', '.join(inputs)})",
        f"outputs ({', '.join(manifest['out_keys'] + [f'saved {s}' for s in manifest['saved']])})",
        f"runtime buffers ({', '.join(manifest['runtime'].values()) or 'none'})",
    ]
    return problems, checked


def check_guards(graph: dict, inputs: list[str]) -> list[str]:
    """The guards that are not plain size checks of `inputs` (each would run as Python on every call)."""
    found = []
    for i, guard in enumerate(graph.get("guards_code", [])):
        problem = guard_problem(guard, set(inputs))
        if problem:
            found.append(
                f"guards_code[{i}]: guard code {shown(guard)} {problem} (it would run as Python on every call)"
            )
    return found


def _spec_name(value: dict) -> str:
    arg = value["arg"]
    return arg["as_tensor"]["name"] if "as_tensor" in arg else arg["name"]


def _check_calls(calls: list, manifest: dict) -> list[str]:
    """The root call signature: the manifest's inputs in, its outputs (and saved values) out."""
    if not calls or calls[0]["fqn"] != "" or calls[0].get("signature") is None:
        return ["module_call_graph: the first entry is not the root call with its signature"]
    problems = [
        f"module_call_graph[{i}]: only the root call may carry a signature"
        for i, c in enumerate(calls[1:], 1)
        if c.get("signature")
    ]
    root = calls[0]["signature"]
    if root.get("forward_arg_names") != manifest["inputs"]:
        problems.append("module_call_graph: the forward's argument names are not the manifest's inputs")
    leaf = 0
    outputs = {key: leaf for key in manifest["out_keys"]}
    if manifest["saved"]:
        outputs["saved"] = {name: leaf for name in manifest["saved"]}
    expected = {
        "in_spec": pytree.treespec_dumps(pytree.tree_structure(((leaf,) * len(manifest["inputs"]), {}))),
        "out_spec": pytree.treespec_dumps(pytree.tree_structure(outputs)),
    }
    for key, want in expected.items():
        try:
            same = parse_json(root[key].encode(), 1 << 20) == json.loads(want)
        except Invalid:
            same = False
        if not same:
            what = (
                "inputs (a tuple of the manifest's inputs)"
                if key == "in_spec"
                else "outputs (the manifest's out_keys and saved)"
            )
            problems.append(f"module_call_graph: the {key} is not that of the manifest's {what}")
    return problems
