"""What every benchmark family shares: timing, the machine description, and result sections.

Timing: each candidate is a zero-argument callable. `paired_ratios` runs, in each of `rounds`
rounds, every candidate in turn, each right after the baseline (so a slow phase of a shared
machine hits both sides of a ratio alike). Each side runs `repeats` batches of calls, each
batch sized to take about `target_seconds`, and keeps its best batch (a burst of other work
slows a batch, never speeds it up). A candidate's ratio is the median over rounds of its
time / the baseline's time in that round; its time, the median of its per-call times.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

THREADS = 1


def setup_process() -> None:
    """One thread, deterministic, quiet: what every benchmark runs under."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    # nnsight 0.8 gives every Python object a `save` attribute; lark looks its grammar rules'
    # callbacks up by name when it builds a parser, so the DSL parser (rule `save`) must be
    # built before nnsight is imported.
    from tdhook_fx.syntax.parse import lark_parser

    lark_parser()


@dataclass
class Config:
    rounds: int = 21  # rounds per measurement (the median is reported)
    repeats: int = 5  # batches per candidate and round (the best is kept)
    target_seconds: float = 0.01  # about how long one batch of calls takes
    quick: bool = False  # fewer rounds and no inductor compilation (a smoke run)
    models: tuple[str, ...] | None = None  # the workloads to run (None: all of them)


def calls_per_round(fn: Callable[[], object], target_seconds: float) -> int:
    """How many calls take about `target_seconds` (after one warm-up call)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_seconds / once))


@dataclass
class Timing:
    seconds: float  # per call (median over rounds)
    ratio: float  # against the baseline (median over rounds of the paired ratios)


def paired_ratios(baseline: Callable[[], object], candidates: dict[str, Callable[[], object]], config: Config) -> dict[str, Timing]:
    """Each candidate against `baseline`, paired round by round (see the module docstring)."""
    everything = {"__baseline__": baseline, **candidates}
    counts = {name: calls_per_round(fn, config.target_seconds) for name, fn in everything.items()}
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(config.rounds):
            for name, fn in candidates.items():
                base = min(_batch(baseline, counts["__baseline__"]) for _ in range(config.repeats))
                mine = min(_batch(fn, counts[name]) for _ in range(config.repeats))
                seconds[name].append(mine)
                ratios[name].append(mine / base)
    return {name: Timing(statistics.median(seconds[name]), statistics.median(ratios[name])) for name in candidates}


def _batch(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def paired_once(baseline: Callable[[], object], candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    """`paired_ratios` for calls that take seconds: one call per side and round (call each once
    beforehand, e.g. to check its result: that is the warm-up)."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    ratios: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in candidates.items():
                base = timed_once(baseline)
                mine = timed_once(fn)
                seconds[name].append(mine)
                ratios[name].append(mine / base)
    return {name: Timing(statistics.median(seconds[name]), statistics.median(ratios[name])) for name in candidates}


def timed_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Section:
    """One table of results: rows of named cells (numbers are ratios unless `unit` says so)."""

    title: str
    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **cells) -> None:
        self.rows.append(cells)

    def render(self) -> str:
        widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in self.rows)) for c in self.columns}
        lines = [f"## {self.title}", ""]
        lines.append("| " + " | ".join(c.ljust(widths[c]) for c in self.columns) + " |")
        lines.append("|" + "|".join("-" * (widths[c] + 2) for c in self.columns) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)).ljust(widths[c]) for c in self.columns) + " |")
        lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine() -> dict:
    """The machine and software the numbers come from (printed above the tables)."""
    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for package in ("tensordict", "transformers", "tdhook", "nnsight"):
        info[package] = _version(package)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
