"""Activation-patching sweeps: patch each site at each position from a source run, all at once.

    result = tdhook_fx.perf.sweep(model, "transformer.h[*]", td, positions=range(32), metric=logit_diff,
                             in_keys=["input_ids"], out_keys=["logits"])
    result["metric"]        # (sites, positions, ...): metric of the run with that one patch
    result["site"]          # the swept sites' names, one per row (a list of str)
    result["position"]      # (sites, positions): the position of each entry

Each (site S, position p) entry equals running `patch S[:, p]` (the index on dimension `dim`)
with the source inputs at `(source, in_key)`, e.g. with `tdhook_fx.reference.run`, and applying
`metric` to that run's outputs. What the separate runs share is computed once:

1. the source run, once, up to the last swept site (the values to patch in);
2. the target run, once, up to the last swept site: every site's value and, per site, the
   "frontier" that the rest of the model reads (`passes/split.py` cuts the captured graph);
3. per site, only the part of the model after it, for a chunk of positions at a time, batched
   with `torch.func.vmap` (a model whose ops cannot be batched runs them one by one).

Chunks are sized to `memory_budget` (bytes per patched run measured on the first one); a
progress bar (tqdm) shows on sweeps that take more than a couple of seconds.

Over many prompts, streamed in batches, to disk (the on-disk format of `tdhook_fx.collect`):

    stored = tdhook_fx.sweep(model, "transformer.h[*]", loader, path="sweep/", metric=per_prompt_gap, ...)
    stored["metric"]        # (prompts, sites, positions, ...), memory-mapped
    stored["site"], stored["position"]   # the names and positions, shared by every prompt

Each batch is swept as above (one capture and graph cut, made on the first batch, serve them
all); its rows are appended to disk at once, a rerun resumes after the last complete batch, and
under `torchrun` each process takes its share of the batches (`tdhook_fx.data.stream`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tdhook_fx.compiler.capture import capture, join_keys, key_name
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.capture.sites import SiteInfo
from tdhook_fx.compiler.pipeline import DEFAULT_IN_KEYS, DEFAULT_OUT_KEYS
from tdhook_fx.compiler.resolve import DEFAULT_PATCH_SOURCE, match_sites
from tdhook_fx.data.progress import progress_bar
from tdhook_fx.errors import BindingError, TdhookFxError
from tdhook_fx.perf.split import Cut, cut

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for one batched chunk of patched runs
PROGRESS_DELAY_SECONDS = 2.0


def sweep(
    model: nn.Module,
    sites: str,
    inputs,
    *,
    positions: Iterable[int] | None = None,
    dim: int = 1,
    metric: Callable[[TensorDictBase], torch.Tensor] | None = None,
    source: str = DEFAULT_PATCH_SOURCE,
    in_keys=None,
    out_keys=None,
    frontend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int | None = None,
    progress: bool | None = None,
    path=None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> TensorDictBase:
    """Patch every site matched by `sites` at every position, one patch per run; a metric per pair.

    - `sites`: a DSL site selector (`transformer.h[*]`, `/mlp$/`, `blocks.{0,2}.attn:out.0`).
    - `inputs`: a TensorDict with the target inputs at `in_keys` and the source inputs at
      `(source, in_key)`, as `patch ... from source` reads them.
    - `positions`: indices along dimension `dim` of each site's value (default: all of them);
      position p patches `site[:, p]` for `dim=1` (`site[..., p]` style indices via `dim=-1`).
    - `metric(outputs)`: called once per patched run with a TensorDict that holds `inputs`'
      entries and that run's `out_keys`, returns a tensor; without it the outputs are returned.

    Returns a TensorDict with batch size [sites, positions]: "metric" (or each out_key),
    "site" (the names of the rows, a list of str: `result["site"][i]`) and "position" (a
    tensor of the entries' positions). Runs without gradients; the model must be in eval mode.

    With `path`, the prompts are streamed in batches to disk: `inputs` is then an iterable of
    such TensorDicts (a DataLoader, a list, a generator) or one TensorDict of many prompts cut
    into `batch_size` (default 32). The metric must give one value per prompt (shape (B, ...)).
    Returns the memory-mapped result, batch size [prompts]: "metric" (prompts, sites,
    positions, ...) (or each out_key), and "site" and "position" lists shared by all prompts.
    Resumption, `overwrite` and `torchrun` work as for `tdhook_fx.collect`.
    """
    if model.training:
        raise TdhookFxError(
            "sweep needs the model in eval mode: batched patched runs must not draw dropout masks "
            "or update batch-norm statistics\n  hint: call model.eval() first"
        )
    options = _Options(list(in_keys or DEFAULT_IN_KEYS), list(out_keys or DEFAULT_OUT_KEYS), metric, source, memory_budget, chunk_size)
    if path is not None:
        return _sweep_to_disk(model, sites, inputs, positions, dim, frontend, options, path, batch_size, overwrite, progress)
    if not isinstance(inputs, TensorDictBase):
        raise BindingError(
            "sweep reads its inputs from a TensorDict (target at in_keys, source at (source, in_key))\n"
            "  hint: to sweep many batches of prompts, stream them to disk: sweep(..., path='sweep/')"
        )
    if batch_size is not None:
        raise BindingError("batch_size cuts the prompts into batches streamed to disk: pass path=... too")
    prepared = _Prepared(model, sites, inputs, positions, dim, frontend, options)
    return _result(prepared.run(inputs, progress), prepared.swept, prepared.positions)


@dataclass(frozen=True)
class _Options:
    in_keys: list
    out_keys: list
    metric: Callable | None
    source: str
    memory_budget: int
    chunk_size: int | None


class _Prepared:
    """What every batch of a sweep shares: the model captured on the first one and cut at the sites."""

    def __init__(self, model: nn.Module, sites: str, inputs: TensorDictBase, positions, dim: int, frontend: str, options: _Options):
        captured, table = capture(model, example_inputs(inputs, options.in_keys), options.in_keys, options.out_keys, frontend)
        self.swept = _resolve_sites(sites, table)
        self.positions = _positions(positions, self.swept, dim)
        self.pieces = cut(captured.graph_module, [s.name for s in self.swept])
        self.dim = dim
        self.options = options

    def run(self, inputs: TensorDictBase, progress: bool | None) -> list[list]:
        """Per site, per position: the metric (or the outputs) of that one patched run on `inputs`."""
        options, dim = self.options, self.dim
        target = example_inputs(inputs, options.in_keys)
        source_inputs = _source_inputs(inputs, options.source, options.in_keys)
        with torch.no_grad():
            prefix_outputs = self.pieces.prefix(*target)
            source_values = self.pieces.values_only(*source_inputs)
            sweeper = _SiteSweep(self.pieces, inputs, options.out_keys, options.metric, options.memory_budget, options.chunk_size)
            with _progress_bar(len(self.swept) * len(self.positions), progress) as bar:
                per_site = []
                for i, site in enumerate(self.swept):
                    target_value = prefix_outputs[i]
                    if target_value.shape[dim] != site.shape[dim]:
                        raise TdhookFxError(
                            f"{site.name} has {target_value.shape[dim]} positions along dimension {dim} in this batch "
                            f"but {site.shape[dim]} in the first: every batch must have the same length there"
                        )
                    frontier = self.pieces.frontier_values(site.name, prefix_outputs)
                    per_site.append(sweeper.site(site, target_value, source_values[i], frontier, self.positions, dim, bar))
        return per_site


def _sweep_to_disk(model, sites, inputs, positions, dim, frontend, options: _Options, path, batch_size, overwrite, progress):
    """The sweep of every batch of prompts, appended to disk as rows of one prompt each."""
    from tdhook_fx.data.batches import batch_source
    from tdhook_fx.data.rows import Rows
    from tdhook_fx.data.stream import stream_to_disk

    prepared: list[_Prepared] = []  # made on this process's first batch

    def rows_of(batch: TensorDictBase, number: int) -> Rows:
        if not prepared:
            prepared.append(_Prepared(model, sites, batch, positions, dim, frontend, options))
        sweep = prepared[0]
        per_site = sweep.run(batch, False)
        rows = TensorDict(batch_size=batch.batch_size)
        for key, value in _stacked(per_site).items():
            if value.dim() < 3 or value.shape[2] != batch.batch_size[0]:
                raise TdhookFxError(
                    f"batch {number}: the {key} of one patched run has shape {tuple(value.shape[2:])}; streamed to disk, "
                    f"a sweep stores one row per prompt, so it must start with the {batch.batch_size[0]} prompts of the "
                    "batch\n  hint: return per-prompt values from the metric (no mean over the batch)"
                )
            rows.set(key, value.movedim(2, 0).contiguous())
        constants = {"site": [s.name for s in sweep.swept], "position": sweep.positions}
        return Rows(rows, batch.batch_size[0], constants=constants)

    settings = {
        "what": "sweep",
        "sites": sites,
        "positions": None if positions is None else [int(p) for p in positions],
        "dim": dim,
        "metric": None if options.metric is None else getattr(options.metric, "__qualname__", type(options.metric).__name__),
        "source": options.source,
        "in_keys": [list(k) if isinstance(k, tuple) else k for k in options.in_keys],
        "out_keys": [list(k) if isinstance(k, tuple) else k for k in options.out_keys],
        "model": type(model).__qualname__,
        "batch_size": batch_size,
    }
    source = batch_source(inputs, batch_size)
    return stream_to_disk(source, path, rows_of, settings=settings, overwrite=overwrite, progress=progress, description="patching sweep")


# ---- inputs and sites ---------------------------------------------------------------------------


def _source_inputs(inputs: TensorDictBase, source: str, in_keys) -> tuple[torch.Tensor, ...]:
    found = []
    for key in in_keys:
        full = join_keys(source, key)
        value = inputs.get(full, None)
        if value is None:
            raise BindingError(
                f"the inputs have no source input at {full!r}: a sweep patches values from a run on "
                f"the source inputs\n  hint: inputs[{full!r}] = <the source {key_name(key)}>"
            )
        found.append(value)
    return tuple(found)


def _resolve_sites(sites: str, table) -> list[SiteInfo]:
    hint = "the sweep chooses the index itself: name whole sites and pass positions=... and dim=..."
    return match_sites(table, sites, whole_site_hint=hint)


def _positions(positions, swept: list[SiteInfo], dim: int) -> list[int]:
    sizes = {}
    for site in swept:
        if not -len(site.shape) <= dim < len(site.shape):
            raise TdhookFxError(
                f"{site.name} has shape {tuple(site.shape)}: it has no dimension {dim} to sweep\n"
                "  hint: pass dim=... naming one of its dimensions"
            )
        sizes[site.name] = site.shape[dim]
    if positions is None:
        if len(set(sizes.values())) > 1:
            raise TdhookFxError(
                f"the swept sites differ in the size of dimension {dim} ({sizes}); pass positions=..."
            )
        return list(range(next(iter(sizes.values()))))
    positions = [int(p) for p in positions]
    for name, size in sizes.items():
        bad = [p for p in positions if not -size <= p < size]
        if bad:
            raise TdhookFxError(
                f"position {bad[0]} is out of range for dimension {dim} of {name} (size {size})"
            )
    if not positions:
        raise TdhookFxError("positions is empty: nothing to sweep")
    return positions


# ---- running ------------------------------------------------------------------------------------


class _SiteSweep:
    """Runs one site's patched suffixes in chunks and applies the metric to each run."""

    def __init__(self, pieces: Cut, inputs: TensorDictBase, out_keys, metric, memory_budget: int, chunk_size):
        self.pieces = pieces
        self.inputs = inputs
        self.out_keys = out_keys
        self.metric = metric
        self.memory_budget = memory_budget
        self.chunk_size = chunk_size
        self.batched = True  # switched off for good if vmap cannot batch the model's ops

    def site(self, site: SiteInfo, target, source, frontier, positions, dim, bar) -> list:
        suffix = self.pieces.suffixes[site.name]
        results = []
        first = [positions[0]]
        bytes_per_run, outputs = _measure(lambda: self._run(suffix, target, source, frontier, first, dim))
        results.extend(self._metrics(outputs, 1))
        bar.update(1)
        size = self.chunk_size or max(1, int(self.memory_budget // max(bytes_per_run, 1)))
        rest = positions[1:]
        for start in range(0, len(rest), size):
            chunk = rest[start : start + size]
            outputs = self._run(suffix, target, source, frontier, chunk, dim)
            results.extend(self._metrics(outputs, len(chunk)))
            bar.update(len(chunk))
        return results

    def _run(self, suffix, target, source, frontier, chunk: list[int], dim: int) -> tuple:
        """The suffix on one patched site value per position in `chunk`; outputs stacked on dim 0."""
        variants = _patched_variants(target, source, chunk, dim)
        if self.batched and len(chunk) > 1:
            try:
                return self._batched(suffix, variants, frontier)
            except Exception as error:  # noqa: BLE001 - an op vmap cannot batch: run one by one (still exact)
                self.batched = False
                warnings.warn(
                    f"sweep: cannot batch the patched runs with torch.func.vmap ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); running them one at a time",
                    stacklevel=4,
                )
        runs = [self._call(suffix, variant, frontier) for variant in variants]
        return tuple(torch.stack(values) for values in zip(*runs))

    def _call(self, suffix, variant, frontier):
        if self.pieces.mutates:  # the suffix may change its inputs in place: give it its own copies
            frontier = [f.clone() if isinstance(f, torch.Tensor) else f for f in frontier]
        return tuple(suffix(variant, *frontier))

    def _batched(self, suffix, variants: torch.Tensor, frontier) -> tuple:
        count = variants.shape[0]
        if self.pieces.mutates:  # in-place ops need batched (and private) copies of their inputs
            frontier = [_repeat(f, count) if isinstance(f, torch.Tensor) else f for f in frontier]
            in_dims = (0, *(0 if isinstance(f, torch.Tensor) else None for f in frontier))
        else:
            in_dims = (0, *([None] * len(frontier)))
        batched = torch.func.vmap(lambda v, *f: tuple(suffix(v, *f)), in_dims=in_dims)
        with _batchable_attention(variants):
            return batched(variants, *frontier)

    def _metrics(self, outputs: tuple, count: int) -> list:
        results = []
        for k in range(count):
            run = {key: value[k] for key, value in zip(self.out_keys, outputs)}
            if self.metric is None:
                results.append(run)
                continue
            td = self.inputs.copy()
            for key, value in run.items():
                td.set(key, value)
            value = self.metric(td)
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(value)
            results.append(value.detach())
        return results


def _patched_variants(target: torch.Tensor, source: torch.Tensor, chunk: list[int], dim: int) -> torch.Tensor:
    """One copy of the site's target value per position, with that position taken from the source."""
    variants = target.unsqueeze(0).repeat(len(chunk), *([1] * target.dim()))
    for k, position in enumerate(chunk):
        variants[k].select(dim, position).copy_(source.select(dim, position))
    return variants


def _repeat(value: torch.Tensor, count: int) -> torch.Tensor:
    return value.unsqueeze(0).expand(count, *value.shape).clone()


@contextlib.contextmanager
def _batchable_attention(example: torch.Tensor):
    """On CPU, fused attention has no vmap rule (it would run per example): use the math kernel."""
    if example.device.type != "cpu":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class _AllocatedBytes(TorchDispatchMode):
    """Counts the bytes of every tensor the ops inside allocate (an upper bound on the peak)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.total += value.numel() * value.element_size()
        return result


def _measure(run):
    with _AllocatedBytes() as counter:
        outputs = run()
    return counter.total, outputs


# ---- progress and result ------------------------------------------------------------------------


def _progress_bar(total: int, progress: bool | None):
    """tqdm when asked (`progress=True`) or, by default, once a sweep has run a couple of seconds."""
    delay = 0.0 if progress else PROGRESS_DELAY_SECONDS
    return progress_bar(progress is not False, progress, total=total, desc="patching sweep", unit="run", delay=delay, leave=bool(progress))


def _stacked(per_site: list[list]) -> dict[str, torch.Tensor]:
    """"metric" (or each out_key) stacked to (sites, positions, ...)."""
    first = per_site[0][0]
    if isinstance(first, dict):
        return {key: torch.stack([torch.stack([run[key] for run in runs]) for runs in per_site]) for key in first}
    return {"metric": torch.stack([torch.stack(runs) for runs in per_site])}


def _result(per_site: list[list], swept: list[SiteInfo], positions: list[int]) -> TensorDict:
    batch = [len(swept), len(positions)]
    result = TensorDict(batch_size=batch)
    for key, value in _stacked(per_site).items():
        result.set(key, value)
    result.set("position", torch.tensor(positions).expand(*batch).clone())
    result.set_non_tensor("site", [s.name for s in swept])  # one name per row, as a sweep on disk stores them
    return result
