"""Positions: a program written for one forward over the whole sequence, split into two step programs.

Generation computes the prompt's positions in one call (the prefill) and then one position per
call (the decoding steps). A program keeps the meaning it has in one forward over the whole
sequence (prompt and generated tokens): a statement without a tensor index on the sequence
dimension applies at every position computed; one whose index picks positions on the sequence
dimension (`h[:, 3]`, `h[:, 2:9]`, `h[:, $pos]`) applies exactly at the calls that compute those
positions. `plan_positions` resolves the program against the sites of the whole sequence and
writes two programs:

- the prefill program: positional statements clipped to the prompt (`h[:, 2:9]` with a 5-token
  prompt becomes `h[:, 2:5]`), those entirely after it dropped;
- the decoding program: positional statements entirely inside the prompt dropped, the others
  indexing the step's single position (`h[:, 0]`, `h[:, 0:1]`) behind a gate, a runtime value
  that is 1 at the steps computing one of their positions and 0 elsewhere
  (`steer h[:, 0] += $gen_gate_0 * ($v)`), so that one graph serves every step.

Saved values are put back together in the order of the positions (`PositionPlan.assemble`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.compiler.ir import Intervention
from tdhook_fx.compiler.resolve import resolve
from tdhook_fx.errors import GenerationError
from tdhook_fx.syntax import ast

GATE_PREFIX = "gen_gate"


@dataclass(frozen=True)
class Positions:
    """The positions `[start, stop)` an index picks on the sequence dimension; `single` for an
    integer (or `$name`) index, which removes the dimension."""

    start: int
    stop: int
    single: bool

    def clip(self, start: int, stop: int) -> tuple[int, int]:
        return max(self.start, start), min(self.stop, stop)


@dataclass(frozen=True)
class SavedLayout:
    """How one saved value is put together from the calls' values."""

    dim: int | None  # the sequence dimension of the saved value (None: a single position)
    positions: Positions | None  # None: every position computed


@dataclass
class PositionPlan:
    """The two step programs of one program, and how their saved values join (see the module doc)."""

    prompt: int  # positions computed by the prefill
    prefill: ast.Program
    decode: ast.Program
    gates: dict[str, Positions] = field(default_factory=dict)  # decoding gate name -> its positions
    saved: dict[str, SavedLayout] = field(default_factory=dict)
    modules: frozenset[str] = frozenset()  # the modules whose inputs or outputs the program touches

    def gate_values(self, position: int, device) -> dict[str, torch.Tensor]:
        """The gates of the decoding step that computes `position`."""
        return {
            name: torch.tensor(1.0 if positions.start <= position < positions.stop else 0.0, device=device)
            for name, positions in self.gates.items()
        }

    def keeps(self, name: str, position: int) -> bool:
        """Whether the decoding step computing `position` contributes to the saved value `name`."""
        layout = self.saved[name]
        return layout.positions is None or layout.positions.start <= position < layout.positions.stop

    def assemble(self, prefill: dict, steps: list[dict], computed: int) -> dict[str, torch.Tensor]:
        """The saved values of the whole generation: `prefill` holds the prefill's values, `steps[i]` those
        the decoding step computing position `prompt + i` kept; `computed` positions were computed."""
        result = {}
        for name, layout in self.saved.items():
            parts = ([prefill[name]] if name in prefill else []) + [step[name] for step in steps if name in step]
            positions = layout.positions
            if not parts or (positions is not None and positions.single and positions.start >= computed):
                first = positions.start if positions is not None else 0
                raise GenerationError(
                    f"'{name}' saves position {first}, but the generation stopped after computing {computed} "
                    "positions (every sequence had ended)\n"
                    "  hint: save positions the generation reaches, or raise max_new_tokens"
                )
            result[name] = parts[0] if layout.dim is None else torch.cat(parts, dim=layout.dim)
        return result


def plan_positions(
    program: ast.Program,
    whole: SiteTable,
    sequence_dims: dict[str, tuple[int, ...]],
    values: dict,
    prompt: int,
    text: str | None = None,
    source: str = "program",
) -> PositionPlan:
    """Split `program` into its prefill and decoding programs.

    `whole` is the step's site table for the whole sequence (every position generation may
    compute); `sequence_dims[site]` the dimensions of each site that grow with the sequence;
    `values` the runtime values (they decide `$name` positions); `prompt` the prompt's length.
    """
    resolved = resolve(program, whole, text, source)
    by_statement: dict[int, list[Intervention]] = {}
    for intervention in resolved.interventions:
        by_statement.setdefault(id(intervention.statement), []).append(intervention)
    modules = frozenset(i.site.module for i in resolved.interventions if i.site.is_activation)
    plan = PositionPlan(prompt, ast.Program(), ast.Program(), modules=modules)
    prefill, decode = [], []
    positional_saves: dict[str, Positions | None] = {}
    for statement in program.statements:
        interventions = by_statement.get(id(statement), [])
        _refuse(statement)
        where = _positions(statement, interventions, sequence_dims, values)
        _check_saved_references(statement, where, positional_saves)
        if isinstance(statement, ast.Save):
            for intervention in interventions:
                positional_saves[intervention.name] = where[1] if where else None
                plan.saved[intervention.name] = _layout(intervention, where, sequence_dims)
        if where is None:
            prefill.append(statement)
            decode.append(statement)
            continue
        entry, positions = where
        if positions.start < prompt:
            low, high = positions.clip(0, prompt)
            prefill.append(_with_entry(statement, interventions[0], entry, ast.IntEntry(low) if positions.single else ast.Slice(low, high)))
        if positions.stop > prompt:
            local = ast.IntEntry(0) if positions.single else ast.Slice(0, 1)
            gated = _with_entry(statement, interventions[0], entry, local)
            if not isinstance(statement, ast.Save):
                gate = _gate_name(len(plan.gates), resolved.runtime_names)
                plan.gates[gate] = positions
                gated = _gated(gated, ast.Var(gate))
            decode.append(gated)
    plan.prefill = ast.Program(tuple(prefill))
    plan.decode = ast.Program(tuple(decode))
    return plan


def _refuse(statement) -> None:
    """Statements that have no meaning during generation."""
    if isinstance(statement, ast.Patch):
        raise GenerationError(
            f"{statement}: patching from a source run is not supported during generation (each step would "
            "need the source's value at a position the source never computes)\n"
            "  hint: save the source's values with a forward over the source prompt, then write them at the "
            "prompt's positions: set SITE[:, 0:T] = $values"
        )
    if isinstance(statement, ast.Stop):
        raise GenerationError(f"{statement}: a program that stops early computes no logits, so it cannot generate")
    if getattr(statement, "grad", False):
        raise GenerationError(f"{statement}: generation runs without gradients; drop the gradient statements")


def _positions(statement, interventions: list[Intervention], sequence_dims, values):
    """`(entry, Positions)` where the statement's tensor index picks sequence positions, else None."""
    found = set()
    for intervention in interventions:
        if intervention.index is None or intervention.site.kind == "param":
            continue
        items = intervention.index
        for entry, item in enumerate(items):
            _refuse_tensor_index(statement, item, values)
            dim = _dim_of(items, entry, len(intervention.site.shape))
            if dim is not None and dim in sequence_dims.get(intervention.site.name, ()) and not _whole(item):
                found.add((entry, _picked(statement, item, values, intervention.site)))
    if len(found) > 1:
        raise GenerationError(
            f"{statement}: its sites index the sequence differently ({len(found)} ways); write one statement per site"
        )
    return next(iter(found), None)


def _dim_of(items: tuple, entry: int, ndim: int) -> int | None:
    """The site dimension the index item at `entry` applies to (None for `...`)."""
    if items[entry] is Ellipsis:
        return None
    before = items.index(Ellipsis) if Ellipsis in items else len(items)
    return entry if entry < before else ndim - (len(items) - entry)


def _whole(item) -> bool:
    return isinstance(item, slice) and item.start is None and item.stop is None and item.step is None


def _value(bound, values: dict):
    if isinstance(bound, ast.Var):
        return values.get(bound.name)
    return bound


def _refuse_tensor_index(statement, item, values: dict) -> None:
    bounds = (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)
    for bound in bounds:
        value = _value(bound, values)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            raise GenerationError(
                f"{statement}: ${bound.name} is a tensor of shape {tuple(value.shape)}; during generation an "
                "index value must be a single integer\n"
                "  hint: write one statement per position, or a slice $start:$stop"
            )


def _picked(statement, item, values: dict, site: SiteInfo) -> Positions:
    """The positions `item` picks on the sequence dimension of the whole sequence."""
    if isinstance(item, slice):
        start, stop, step = (_integer(statement, _value(b, values), b) for b in (item.start, item.stop, item.step))
        if step not in (None, 1):
            raise GenerationError(f"{statement}: a slice with a step cannot be split into generation steps")
        start = 0 if start is None else start
        positions = Positions(start, stop, single=False) if stop is not None else None
        if positions is None:
            raise GenerationError(
                f"{statement}: an open slice '{start}:' on the sequence dimension of {site.name} has no end while "
                "the sequence grows\n  hint: write the last position: [:, a:b]"
            )
    else:
        position = _integer(statement, _value(item, values), item)
        positions = Positions(position, position + 1, single=True)
    if positions.start < 0 or positions.stop < 0:
        raise GenerationError(
            f"{statement}: a negative position counts from the end of a sequence that is still growing\n"
            "  hint: count from the start of the sequence (prompt positions first, then the generated ones)"
        )
    return positions


def _integer(statement, value, bound) -> int | None:
    if value is None and isinstance(bound, ast.Var):
        raise GenerationError(f"{statement}: no value for ${bound.name}, which picks positions")
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            raise GenerationError(f"{statement}: ${bound.name} holds a non-integer position")
        return int(value)
    return value


def _layout(intervention: Intervention, where, sequence_dims) -> SavedLayout:
    site = intervention.site
    items = intervention.index or ()
    if where is not None and where[1].single:
        return SavedLayout(None, where[1])
    seq = [d for d in sequence_dims.get(site.name, ()) if d not in _picked_dims(items, len(site.shape))]
    if len(seq) != 1:
        raise GenerationError(
            f"{intervention.statement}: {site.name} ({'x'.join(map(str, site.shape))}) has "
            f"{'no' if not seq else len(seq)} sequence dimension{'s' if len(seq) > 1 else ''}, so its values "
            "from the generation steps cannot be put together along the sequence"
        )
    removed = sum(1 for d in _picked_dims(items, len(site.shape)) if d < seq[0])
    return SavedLayout(seq[0] - removed, None if where is None else where[1])


def _picked_dims(items: tuple, ndim: int) -> list[int]:
    """The dimensions an index removes (integers and `$name` values)."""
    return [
        _dim_of(items, entry, ndim)
        for entry, item in enumerate(items)
        if item is not Ellipsis and not isinstance(item, slice)
    ]


def _check_saved_references(statement, where, positional_saves: dict) -> None:
    """`@name` must come from a value saved at the same positions: a step only has its own positions."""
    value = getattr(statement, "value", None)
    for name in _saved_names(value):
        saved_at = positional_saves.get(name)
        here = where[1] if where else None
        if saved_at != here:
            raise GenerationError(
                f"{statement}: '@{name}' was saved at other positions than this statement's; during generation "
                "each step computes its own positions only\n"
                "  hint: use a value saved over the same positions"
            )


def _saved_names(expr) -> list[str]:
    if isinstance(expr, ast.Saved):
        return [expr.name]
    if isinstance(expr, ast.BinOp):
        return _saved_names(expr.left) + _saved_names(expr.right)
    if isinstance(expr, ast.Neg):
        return _saved_names(expr.operand)
    if isinstance(expr, ast.Call):
        return [n for argument in expr.args for n in _saved_names(argument)]
    return []


def _with_entry(statement, intervention: Intervention, entry: int, new) -> ast.Node:
    """`statement` with its tensor index's `entry` replaced by `new` (and `$name`s in the index kept)."""
    site = statement.site
    if site.index is not None:
        index, path = site.index, site.path
    else:  # the tensor index was the path's last bracket (`mlp[3]`)
        index, path = site.path.segments[-1], ast.Path(site.path.segments[:-1])
    entries = list(index.entries)
    entries[entry] = new
    return replace(statement, site=replace(site, path=path, index=ast.Index(tuple(entries))))


def _gated(statement, gate: ast.Var):
    """The statement applied where `gate` is 1 and a no-op where it is 0 (exactly, for finite values)."""
    value = statement.value
    on = ast.BinOp("*", gate, value)
    off = ast.BinOp("-", ast.Number(1), gate)
    if isinstance(statement, ast.Set):
        return replace(statement, value=ast.BinOp("+", on, ast.BinOp("*", off, ast.SiteValue())))
    if statement.op == "*=":
        return replace(statement, value=ast.BinOp("+", on, off))
    return replace(statement, value=on)


def _gate_name(number: int, taken) -> str:
    name = f"{GATE_PREFIX}_{number}"
    while name in taken:
        name += "_"
    return name


def whole_sequence_table(
    first: SiteTable, first_length: int, second: SiteTable, second_length: int, length: int, model
) -> tuple[SiteTable, dict[str, tuple[int, ...]]]:
    """The site table for a chunk of `length` positions, from the tables of chunks of two other
    lengths, and each site's sequence dimensions (those whose sizes differ between the two; each
    grows linearly with the chunk)."""
    sites, dims = [], {}
    for name, site in first.sites.items():
        other = second.sites.get(name)
        if other is None or len(other.shape) != len(site.shape):
            continue
        varying = tuple(i for i, (x, y) in enumerate(zip(site.shape, other.shape)) if x != y)
        dims[name] = varying
        shape = list(site.shape)
        for i in varying:
            slope = (site.shape[i] - other.shape[i]) // (first_length - second_length)
            shape[i] = site.shape[i] + slope * (length - first_length)
        sites.append(replace(site, shape=tuple(shape)))
    return SiteTable(sites, model), dims
