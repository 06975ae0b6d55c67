"""Compile time: the first compile of a model (capture included), then new programs on the
cached capture (parse, resolve, rewrite, recompile only), and the capture of a model seen in
an earlier process (the persistent capture cache, `compiler/capture/disk.py`)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tdhook_fx
from benchmarks.common import Config, Section, log
from benchmarks.workloads import selected


def run(config: Config) -> list[Section]:
    section = Section(
        "Compile time (milliseconds)",
        [
            "model", "first compile (capture included)", "of which capture", "new program on the cached capture",
            "capture in a fresh process, cache cold", "capture in a fresh process, cache warm", "front end",
        ],
        notes=[
            (
                "first compile: a fresh model object, so nothing is cached (median of "
                f"{_first_repeats(config)} fresh models; the persistent capture cache off)"
            ),
            (
                "fresh process: the capture of the first compile in a new Python process, with an empty "
                "persistent capture cache (cold), then in another new process with the entry the first one "
                "wrote (warm: loaded and checked against the eager model instead of captured)"
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
            seconds, compiled = _timed_compile(workload, workload.program("steer"), persistent=False)
            firsts.append(seconds)
            captures.append(compiled.capture_seconds)
            frontend = compiled.frontend
        news = [_timed_compile(workload, p)[0] for p in _programs(workload, _program_count(config))]
        cold, warm = _fresh_process_captures(name)
        section.add(
            model=workload.description.split(" (")[0],
            **{
                "first compile (capture included)": round(statistics.median(firsts) * 1000, 1),
                "of which capture": round(statistics.median(captures) * 1000, 1),
                "new program on the cached capture": round(statistics.median(news) * 1000, 1),
                "capture in a fresh process, cache cold": round(cold * 1000, 1),
                "capture in a fresh process, cache warm": round(warm * 1000, 1),
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


def _timed_compile(workload, program: str, persistent: bool = True):
    from tdhook_fx.compiler.capture.disk import ENVIRONMENT

    before = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = "1" if persistent else "0"
    try:
        start = time.perf_counter()
        compiled = tdhook_fx.compile(
            workload.model, program, example=workload.td, in_keys=workload.in_keys, out_keys=workload.out_keys
        )
        return time.perf_counter() - start, compiled
    finally:
        if before is None:
            del os.environ[ENVIRONMENT]
        else:
            os.environ[ENVIRONMENT] = before


_FRESH_PROCESS = """
import sys
from benchmarks.workloads import ALL
workload = ALL[sys.argv[1]]()
print(workload.compile("steer").capture_seconds)
"""


def _fresh_process_captures(name: str) -> tuple[float, float]:
    """The capture seconds of `name`'s first compile in a new process: cache cold, then warm."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "XDG_CACHE_HOME": cache, "TDHOOK_FX_CAPTURE_CACHE": "1"}
        seconds = []
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "-c", _FRESH_PROCESS, name], cwd=root, env=environment,
                capture_output=True, text=True, check=True,
            )
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
    return seconds[0], seconds[1]
