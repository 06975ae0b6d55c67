"""Compile time: the first compile of a model (capture included), then new programs on the
cached capture (parse, resolve, rewrite, recompile only)."""

from __future__ import annotations

import statistics
import time

import tdhook_fx
from benchmarks.common import Config, Section, log
from benchmarks.workloads import selected


def run(config: Config) -> list[Section]:
    section = Section(
        "Compile time (milliseconds)",
        ["model", "first compile (capture included)", "of which capture", "new program on the cached capture", "front end"],
        notes=[
            (
                "first compile: a fresh model object, so nothing is cached (median of "
                f"{_first_repeats(config)} fresh models)"
            ),
            (
                "new program: each a different program text (steer / set / patch / save at varying layers), "
                f"compiled on the model captured before (median of {_program_count(config)})"
            ),
        ],
    )
    for name, build in selected(config.models).items():
        log(f"compile time: {name}")
        firsts, captures, frontend = [], [], None
        for _ in range(_first_repeats(config)):
            workload = build()  # a fresh model object: no cached capture
            seconds, compiled = _timed_compile(workload, workload.program("steer"))
            firsts.append(seconds)
            captures.append(compiled.capture_seconds)
            frontend = compiled.frontend
        news = [_timed_compile(workload, p)[0] for p in _programs(workload, _program_count(config))]
        section.add(
            model=workload.description.split(" (")[0],
            **{
                "first compile (capture included)": round(statistics.median(firsts) * 1000, 1),
                "of which capture": round(statistics.median(captures) * 1000, 1),
                "new program on the cached capture": round(statistics.median(news) * 1000, 1),
                "front end": frontend,
            },
        )
    return [section]


def _first_repeats(config: Config) -> int:
    return 1 if config.quick else 3


def _program_count(config: Config) -> int:
    return 4 if config.quick else 12


def _programs(workload, count: int) -> list[str]:
    layers = workload.layers
    forms = [
        "steer {layer} += {i} * $v",
        "set {layer}[:, 0] = {i}",
        "patch {layer}",
        "save {layer} as saved_{i}",
    ]
    return [forms[i % len(forms)].format(layer=layers[i % len(layers)], i=i + 1) for i in range(count)]


def _timed_compile(workload, program: str):
    start = time.perf_counter()
    compiled = tdhook_fx.compile(
        workload.model, program, example=workload.td, in_keys=workload.in_keys, out_keys=workload.out_keys
    )
    return time.perf_counter() - start, compiled
