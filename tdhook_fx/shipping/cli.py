"""The command line: `tdhook-fx` (also `python -m tdhook_fx`).

    tdhook-fx check PROGRAM_FILE [--model MODEL]   syntax (and, with a model, resolution) errors
    tdhook-fx sites MODEL [SELECTOR]               the addressable sites, optionally filtered
    tdhook-fx show MODEL PROGRAM [--full]          resolved sites and the rewritten code
    tdhook-fx run MODEL PROGRAM [--set NAME=VALUE] run on the model's sample input, print stats
    tdhook-fx collect MODEL PROGRAM OUT [--data DIR] the saved values over a dataset, to OUT (memmap)
    tdhook-fx export MODEL PROGRAM OUT             OUT.pt2: standalone torch.export; else cm.save
    tdhook-fx draw MODEL PROGRAM OUT               OUT.svg / .html / .dot
    tdhook-fx inspect FILE                         what a .pt2 or a saved file holds
    tdhook-fx cache [info|clear]                   the persistent capture cache: where, how big; empty it

MODEL is a built-in sample model (`gpt2`, `mlp`, `minilm`; random weights except minilm), a
Hugging Face `config.json` (or its folder; built with random weights, nothing in it runs), or
`package.module:function`, a function returning any `nn.Module`, a `tdhook_fx.zoo.Sample` or a
tuple `(model, example, in_keys, out_keys)`. A config's or a module's example input is given as
`--input NAME:DTYPE:SHAPE[:LOW..HIGH]` (repeatable; a config defaults to `input_ids:int64:1x8`),
the outputs to read as `--out-key KEY` (default: the model's first output); see `model_specs.py`. PROGRAM is a file, `-` (standard input) or the program
text itself. Exit codes: 0 ok, 1 a user error (the message, no traceback), 2 an internal error,
141 (as for SIGPIPE) when the output's reader went away (`tdhook-fx inspect x.pt2 | head -1`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

import torch

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.errors import CommandLineError, TdhookFxError
from tdhook_fx.shipping.model_specs import load_model
from tdhook_fx.shipping.printable import escaped, escaped_lines

USER_ERROR = 1
INTERNAL_ERROR = 2
READER_GONE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe closed
_PROGRAM_SUFFIXES = (".dsl", ".tdx", ".txt", ".prog")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit 2, which here means an internal error
        raise CommandLineError(f"{message}\n  usage: {self.format_usage().strip().removeprefix('usage: ')}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 user error, 2 internal error)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except CommandLineError as error:
        print(f"tdhook-fx: error: {error}", file=sys.stderr)
        return USER_ERROR
    except SystemExit as exit_:  # --help, --version
        return int(exit_.code or 0)
    try:
        code = args.command(args) or 0
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return READER_GONE
    except CommandLineError as error:
        print(f"tdhook-fx: error: {escaped(str(error), keep_newlines=True)}", file=sys.stderr)
        return USER_ERROR
    except TdhookFxError as error:  # messages may quote a file's contents: escaped
        print(escaped(str(error), keep_newlines=True), file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        return USER_ERROR
    except Exception:  # a bug in tdhook_fx (or in the user's factory): say so, with the traceback
        print("tdhook-fx: internal error (a bug; please report it with this traceback):", file=sys.stderr)
        traceback.print_exc()
        return INTERNAL_ERROR


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not fail again."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests): nothing to flush later
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, descriptor)
    os.close(null)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tdhook-fx", description="Compile, inspect, run and ship tdhook_fx programs.")
    commands = parser.add_subparsers(dest="name", required=True, parser_class=_Parser, metavar="COMMAND")

    check = commands.add_parser("check", help="check a program's syntax (and, with --model, its sites)")
    check.add_argument("program", metavar="PROGRAM_FILE")
    check.add_argument("--model", metavar="MODEL", help="also resolve the program against MODEL")
    _example_options(check)
    check.set_defaults(command=check_command)

    sites = commands.add_parser("sites", help="list a model's addressable sites")
    sites.add_argument("model", metavar="MODEL")
    sites.add_argument("selector", metavar="SELECTOR", nargs="?", help="a DSL site, e.g. 'transformer.h[0]'")
    _example_options(sites)
    sites.add_argument("--inside", action="store_true", help="list the values computed inside the modules (h.0:add_0, attn:pattern)")
    sites.set_defaults(command=sites_command)

    show = commands.add_parser("show", help="show the resolved sites and the rewritten code")
    _model_and_program(show)
    show.add_argument("--full", action="store_true", help="print every line of the rewritten code")
    show.set_defaults(command=show_command)

    run = commands.add_parser("run", help="run a program on the model's sample input and print what it returns")
    _model_and_program(run)
    _values_option(run)
    run.set_defaults(command=run_command)

    collect = commands.add_parser("collect", help="run a program over a dataset and write its saved values to OUT (memmap)")
    _collect_options(collect)
    collect.set_defaults(command=collect_command)

    export = commands.add_parser("export", help="write OUT.pt2 (standalone torch.export) or a safe save file")
    _model_and_program(export)
    export.add_argument("out", metavar="OUT")
    _values_option(export)
    export.set_defaults(command=export_command)

    draw = commands.add_parser("draw", help="draw the rewritten graph (OUT.svg, .html or .dot)")
    _model_and_program(draw)
    draw.add_argument("out", metavar="OUT")
    draw.add_argument("--depth", default="auto", help="module depth of the boxes: auto (default), a number, or all")
    draw.add_argument("--engine", default="auto", choices=("auto", "graphviz", "python"))
    draw.set_defaults(command=draw_command)

    inspect = commands.add_parser("inspect", help="report what a .pt2 or a saved file holds (nothing is run)")
    inspect.add_argument("file", metavar="FILE")
    inspect.set_defaults(command=inspect_command)

    cache = commands.add_parser("cache", help="show (info) or empty (clear) the persistent capture cache")
    cache.add_argument("action", choices=("info", "clear"), nargs="?", default="info")
    cache.set_defaults(command=cache_command)
    return parser


def _model_and_program(parser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("program", metavar="PROGRAM", help="a program file, - for standard input, or the text")
    _example_options(parser)


def _example_options(parser) -> None:
    parser.add_argument(
        "--input", dest="inputs", action="append", default=[], metavar="NAME:DTYPE:SHAPE[:LOW..HIGH]",
        help="an example input of a config's or a function's model, e.g. input_ids:int64:1x8 (random values)",
    )
    parser.add_argument(
        "--out-key", dest="out_keys", action="append", default=[], metavar="KEY",
        help="a model output to read (default: its first output)",
    )


def _values_option(parser) -> None:
    parser.add_argument(
        "--set", dest="values", action="append", default=[], metavar="NAME=VALUE",
        help="a runtime value: a number, or randn/zeros/ones (a vector as wide as its site's last dimension)",
    )


def _collect_options(parser) -> None:
    _model_and_program(parser)
    parser.add_argument("out", metavar="OUT", help="the directory to write (TensorDict.load_memmap(OUT) reads it)")
    parser.add_argument(
        "--data", metavar="DIR",
        help="a TensorDict saved with td.memmap(DIR) or a Hugging Face dataset saved with save_to_disk "
        "(default: random inputs shaped like the model's sample)",
    )
    parser.add_argument("--examples", type=int, default=256, metavar="N", help="how many random inputs without --data (256)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="examples per batch (32)")
    parser.add_argument("--outputs", nargs="+", default=[], metavar="KEY", help="model outputs or data entries to store too")
    parser.add_argument("--dtype", help="storage dtype of floating-point values, e.g. bfloat16")
    parser.add_argument("--mask", metavar="KEY", help="one row per token where this (examples, tokens) entry is nonzero")
    parser.add_argument("--flatten", action="store_true", help="one row per token (every token)")
    parser.add_argument("--overwrite", action="store_true", help="replace a collection at OUT made with other settings")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, help="a progress bar (default: on a terminal)")
    _values_option(parser)


# ---- commands -----------------------------------------------------------------------------------


def check_command(args) -> int:
    import tdhook_fx

    text, source = read_program(args.program, must_be_file=True)
    program = tdhook_fx.parse(text, source=source)
    count = len(program.statements)
    if args.model is None and (args.inputs or args.out_keys):
        raise CommandLineError("--input and --out-key describe a model's example: pass --model MODEL too")
    if args.model is None:
        print(f"{source}: ok ({count} statement{'s' if count != 1 else ''})")
        return 0
    sample = load_model(args.model, args.inputs, args.out_keys)
    cm = _compile(sample, text, source)
    print(
        f"{source}: ok on {args.model} ({count} statement{'s' if count != 1 else ''}, "
        f"{len(cm.resolved.interventions)} site{'s' if len(cm.resolved.interventions) != 1 else ''})"
    )
    return 0


def sites_command(args) -> int:
    import tdhook_fx

    sample = load_model(args.model, args.inputs, args.out_keys)
    table = tdhook_fx.sites(sample.model, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    chosen = list(table) if args.selector is None else select_sites(table, args.selector)
    if args.inside:
        modules = dict.fromkeys(s.module for s in chosen if s.kind != "param")
        chosen = [s for module in modules for s in table.inside(module)]
    header = f"{len(chosen)} site{'s' if len(chosen) != 1 else ''}"
    print(header + (f" matching {args.selector}" if args.selector else f" of {args.model}"))
    for site in chosen:
        print(f"  {site.describe()}")
    return 0


def show_command(args) -> int:
    _, cm = _compiled(args)
    print(cm.resolved)
    print(annotated_code(cm, full=args.full))
    return 0


def run_command(args) -> int:
    sample, cm = _compiled(args)
    cm.bind(**runtime_values(cm, args.values))
    inputs = cm.example_inputs
    sources = patch_sources(cm, inputs)
    with torch.no_grad():
        result = cm(*inputs, **sources)
    shapes = ", ".join(f"{key_name(k)} {_shape(x)} {_dtype(x)}" for k, x in zip(sample.in_keys, inputs))
    print(f"{args.model}: {type(sample.model).__name__} ({cm.frontend} front end) on {shapes}")
    rows = [(name, value) for name, value in result.items() if name != "saved"]
    saved = list(result.get("saved", {}).items())
    width = max((len(str(name)) for name, _ in rows + saved), default=0)
    if rows:
        print("outputs:")
        _print_stats(rows, width)
    if saved:
        print("saved:")
        _print_stats(saved, width)
    return 0


def collect_command(args) -> int:
    import tdhook_fx
    from tdhook_fx.data.examples import load_examples, random_examples

    sample, cm = _compiled(args)
    cm.bind(**runtime_values(cm, args.values))
    dtype = None
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CommandLineError(f"--dtype {args.dtype}: not a floating-point torch dtype (e.g. bfloat16, float16)")
    if args.examples < 1 or args.batch_size < 1:
        raise CommandLineError("--examples and --batch-size must be at least 1")
    if args.data is not None:
        examples, origin = load_examples(Path(args.data)), args.data
    else:
        sources = [source for source, _ in cm.patch_inputs]
        examples, origin = random_examples(sample.example, cm.in_keys, args.examples, sources), "random inputs"
    stored = tdhook_fx.collect(
        cm, examples, args.out, outputs=args.outputs, dtype=dtype, mask=args.mask, flatten=args.flatten,
        batch_size=args.batch_size, progress=args.progress, overwrite=args.overwrite,
    )
    rows = stored.batch_size[0]
    print(f"{args.out}: {rows} row{'s' if rows != 1 else ''} ({args.model} on {origin})")
    leaves = list(stored.items(include_nested=True, leaves_only=True))
    width = max((len(".".join(k) if isinstance(k, tuple) else k) for k, v in leaves if hasattr(v, "shape")), default=0)
    for key, value in leaves:
        if hasattr(value, "shape"):
            name = ".".join(key) if isinstance(key, tuple) else key
            print(f"  {name:<{width}}  {_shape(value[0]) if rows else '-':<12} {_dtype(value)}")
    print(f"read it with: TensorDict.load_memmap({str(args.out)!r})")
    return 0


def export_command(args) -> int:
    _, cm = _compiled(args)
    cm.bind(**runtime_values(cm, args.values))
    out = Path(args.out)
    if out.suffix == ".pt2":
        from tdhook_fx.shipping.audit import inspect_export

        print(cm.export(out))
        print(str(inspect_export(out)).splitlines()[0])
    else:
        cm.save(out)
        print(f"wrote {out} (safe to load: tdhook_fx.load({str(out)!r}, model))")
    return 0


def draw_command(args) -> int:
    _, cm = _compiled(args)
    depth = args.depth
    if depth == "all":
        depth = None
    elif depth != "auto":
        if not depth.isdigit() or int(depth) < 1:
            raise CommandLineError(f"--depth must be auto, all or a whole number of at least 1, not {depth!r}")
        depth = int(depth)
    print(f"wrote {cm.draw(args.out, depth=depth, engine=args.engine)}")
    return 0


def cache_command(args) -> int:
    from tdhook_fx.compiler.capture import disk

    if args.action == "clear":
        print(f"removed {disk.clear()} entries from {escaped(str(disk.directory()))}")
        return 0
    facts = disk.info()
    state = "on" if facts["enabled"] else f"off ({disk.ENVIRONMENT}=0)"
    print(f"persistent capture cache: {state}")
    print(f"  folder: {escaped(facts['folder'])}")
    print(f"  entries: {facts['entries']}, {facts['bytes'] / 2**20:.1f} MiB of at most {facts['limit'] / 2**20:.0f} MiB")
    if not facts["usable"]:
        print("  not used: the folder belongs to another user or others can write into it (fix its owner or mode)")
    return 0


def inspect_command(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CommandLineError(f"no such file: {escaped(str(path))}")
    if path.suffix == ".pt2":
        from tdhook_fx.shipping.audit import inspect_export

        report = inspect_export(path)
        print(report)
        return 0 if report.safe else USER_ERROR
    from tdhook_fx.shipping.load import read_manifest

    manifest = read_manifest(path)
    capture = manifest["capture"]
    lines = [
        f"{escaped(str(path))}: a tdhook_fx save file (safetensors: JSON and tensors only, nothing runs on loading)",
        f"  model: {escaped(manifest['model']['class'])} ({len(manifest['model']['tensors'])} tensors fingerprinted)",
        (
            f"  capture: {escaped(capture['frontend'])} front end, in_keys {escaped(str(capture['in_keys']))}, "
            f"out_keys {escaped(str(capture['out_keys']))}"
        ),
        *(f"  | {line}" for line in escaped_lines(manifest["program"].rstrip("\n"))),
    ]
    if manifest["bound"]:
        lines.append(f"  bound values: {', '.join('$' + escaped(name) for name in manifest['bound'])}")
    if manifest["functions"]:
        functions = ", ".join("$" + escaped(f) for f in manifest["functions"])
        lines.append(f"  functions to bind again after loading: {functions}")
    print("\n".join(lines))
    return 0


# ---- models and programs ------------------------------------------------------------------------


def read_program(argument: str, must_be_file: bool = False) -> tuple[str, str]:
    """(text, source name): a file, `-` for standard input, or (unless `must_be_file`) the text."""
    if argument == "-":
        return sys.stdin.read(), "<stdin>"
    path = Path(argument)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), argument
        except (OSError, UnicodeDecodeError) as error:
            raise CommandLineError(f"cannot read {argument}: {error}") from None
    looks_like_file = "\n" not in argument and " " not in argument.strip() and argument.endswith(_PROGRAM_SUFFIXES)
    if must_be_file or looks_like_file:
        raise CommandLineError(f"no such program file: {argument}")
    return argument, "program"


def _compile(sample, text: str, source: str):
    import tdhook_fx

    return tdhook_fx.compile(
        sample.model, text, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys, source=source
    )


def _compiled(args):
    """The model and program the command names, compiled: (sample, compiled module)."""
    sample = load_model(args.model, args.inputs, args.out_keys)
    text, source = read_program(args.program)
    return sample, _compile(sample, text, source)


def select_sites(table, selector: str) -> list:
    """The sites a DSL selector names: a site with a port or call exactly, a module with all its sites."""
    from tdhook_fx.compiler.resolve import match_sites

    matched = match_sites(table, selector, parameters=True)
    if re.search(r"[:@]", selector) or all(s.kind == "param" for s in matched):
        return matched
    modules = {s.module for s in matched}
    return [s for s in table if any(s.module == m or s.module.startswith(m + ".") or not m for m in modules)]


def runtime_values(cm, assignments: list[str]) -> dict:
    """`--set NAME=VALUE` as tensors; every runtime value of the program must be given."""
    values = {}
    for assignment in assignments:
        name, equals, text = assignment.partition("=")
        name = name.strip().removeprefix("$")
        if not equals or not name:
            raise CommandLineError(f"--set wants NAME=VALUE, not {assignment!r}")
        if name not in cm.runtime_names:
            known = ", ".join("$" + n for n in cm.runtime_names) or "none"
            raise CommandLineError(f"the program has no runtime value ${name} (its runtime values: {known})")
        values[name] = _value(cm, name, text.strip())
    missing = [name for name in cm.runtime_names if name not in values]
    if missing:
        sets = " ".join(f"--set {name}=..." for name in missing)
        raise CommandLineError(
            f"the program needs {', '.join('$' + m for m in missing)}: pass {sets}\n"
            "  hint: a number (--set alpha=4), or randn/zeros/ones for a vector as wide as the site"
        )
    return values


def _value(cm, name: str, text: str) -> torch.Tensor:
    if re.fullmatch(r"[+-]?\d+", text):
        return torch.tensor(int(text))
    try:
        return torch.tensor(float(text))
    except ValueError:
        pass
    makers = {"randn": torch.randn, "zeros": torch.zeros, "ones": torch.ones}
    if text not in makers:
        raise CommandLineError(f"--set {name}={text}: a value is a number or one of randn, zeros, ones")
    widths = {i.site.shape[-1] for i in cm.resolved.interventions if _uses(i, name) and i.site.shape}
    if len(widths) != 1:
        raise CommandLineError(f"--set {name}={text}: cannot tell how wide ${name} must be; give a number instead")
    generator = torch.Generator().manual_seed(0)
    width = widths.pop()
    return torch.randn(width, generator=generator) if text == "randn" else makers[text](width)


def _uses(intervention, name: str) -> bool:
    from tdhook_fx.syntax.ast import variables

    return name in variables(intervention.statement)


def patch_sources(cm, inputs: tuple) -> dict:
    """For each patch source, inputs of the sample's shapes with other values (seeded)."""
    generator = torch.Generator().manual_seed(1)
    sources = {}
    for source, _ in cm.patch_inputs:
        if source in sources:
            continue
        made = []
        for key, x in zip(cm.in_keys, inputs):
            if x.is_floating_point():
                made.append(torch.randn(x.shape, generator=generator, dtype=x.dtype))
            elif key_name(key) == "attention_mask" or x.dtype == torch.bool:
                made.append(x.clone())
            else:
                made.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=generator, dtype=x.dtype))
        sources[source] = tuple(made)
    return sources


# ---- printing -----------------------------------------------------------------------------------


_FREES = re.compile(r";\s+(\w+\s*=\s*)+None\s*$")


def annotated_code(cm, full: bool = False, context: int = 1) -> str:
    """The rewritten forward, '+' before the lines the program inserted, '~' before changed ones.

    Unless `full`, unchanged lines more than `context` lines away from a change are elided.
    fx's trailing `; x = None` (freeing memory) is dropped for reading.
    """
    from tdhook_fx.shipping.draw import inserted_nodes

    inserted = inserted_nodes(cm)
    extra_inputs = bool(cm.runtime_names or cm.patch_inputs)
    lines = [line for line in cm.code.strip("\n").splitlines() if line.strip()]
    marks = []
    for line in lines:
        assigned = re.match(r"\s+(\w+) = ", line)
        if assigned and assigned.group(1) in inserted:
            marks.append("+")
        elif (line.startswith("def forward") and extra_inputs) or (line.strip().startswith("return") and cm.saved_names):
            marks.append("~")
        else:
            marks.append(" ")
    keep = [full or mark != " " or line.startswith("def ") or line.strip().startswith("return") for mark, line in zip(marks, lines)]
    if not full:
        changed = [i for i, mark in enumerate(marks) if mark == "+"]
        for i in changed:
            for j in range(max(0, i - context), min(len(lines), i + context + 1)):
                keep[j] = True
    hidden = keep.count(False)
    header = (
        f"rewritten forward ({cm.frontend} front end; + inserted, ~ changed"
        + (f"; {hidden} unchanged lines not shown, --full shows them" if hidden else "")
        + "):"
    )
    out = [header]
    skipped = 0
    for mark, line, shown in zip(marks, lines, keep):
        if not shown:
            skipped += 1
            continue
        if skipped:
            out.append(f"     ... {skipped} line{'s' if skipped != 1 else ''}")
            skipped = 0
        out.append(f"  {mark}  {_FREES.sub('', line)}")
    if skipped:
        out.append(f"     ... {skipped} line{'s' if skipped != 1 else ''}")
    return "\n".join(out)


def _print_stats(rows, width: int) -> None:
    for name, value in rows:
        x = value.detach().float()
        stats = (
            f"mean {x.mean().item():+.4f}  std {x.std().item() if x.numel() > 1 else 0.0:.4f}  "
            f"min {x.min().item():+.4f}  max {x.max().item():+.4f}"
            if x.numel()
            else "empty"
        )
        print(f"  {name!s:<{width}}  {_shape(value):<12} {_dtype(value):<8} {stats}")


def _shape(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape)) or "scalar"


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")

