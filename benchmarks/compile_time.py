"""Compile time: the first compile of a model (capture included), then new programs on the
cached capture (parse, resolve, rewrite, recompile only); and the first use of a model seen
in an earlier process (the persistent capture cache, `compiler/capture/disk.py`): its capture
in a fresh process with the cache empty, then in another with the entry the first one wrote."""

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
        ["model", "first compile (capture included)", "of which capture", "new program on the cached capture", "front end"],
        notes=[
            (
                "first compile: a fresh model object, so nothing is cached (median of "
                f"{_first_repeats(config)} fresh models; the persistent capture cache off)"
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
        section.add(
            model=workload.description.split(" (")[0],
            **{
                "first compile (capture included)": round(statistics.median(firsts) * 1000, 1),
                "of which capture": round(statistics.median(captures) * 1000, 1),
                "new program on the cached capture": round(statistics.median(news) * 1000, 1),
                "front end": frontend,
            },
        )
    return [section, _first_use(config)]


FIRST_USE = {  # name -> (description, the code building (model, example, in_keys, out_keys, site))
    "gpt2-small 1x16": (
        "GPT-2 small config (12 x 768), example 1 x 16 tokens",
        "s = zoo.gpt2(n_layer=12, n_embd=768, n_head=12, batch=1, seq=16); site = 'transformer.h.1'",
    ),
    "gpt2-small 4x32": (
        "GPT-2 small config (12 x 768), example 4 x 32 tokens",
        "s = zoo.gpt2(n_layer=12, n_embd=768, n_head=12, batch=4, seq=32); site = 'transformer.h.1'",
    ),
    "minilm": ("all-MiniLM-L6-v2 (pretrained), 2 sentences with their mask", "s = zoo.minilm(); site = 'encoder.layer.1'"),
    "mlp": ("MLP (the built-in sample, fx)", "s = zoo.mlp(); site = '0'"),
}

_FRESH_PROCESS = """
import sys, time
import tdhook_fx
from tdhook_fx import zoo
{build}
start = time.perf_counter()
compiled = tdhook_fx.compile(s.model, "save " + site, example=s.example, in_keys=s.in_keys, out_keys=s.out_keys)
print(compiled.capture_seconds, time.perf_counter() - start)
"""


def _first_use(config: Config) -> Section:
    section = Section(
        "First use: capture in a fresh process (milliseconds)",
        ["model", "cache cold", "cache warm", "warm / cold", "compile, cache warm"],
        notes=[
            (
                "each figure: one new Python process (median of "
                f"{_fresh_repeats(config)}); cold: the persistent capture cache empty (capture by the front "
                "ends, entry written); warm: the entry there (read, checked against one eager forward "
                "and one recorded run of the graph, no front end)"
            ),
            "compile: `tdhook_fx.compile` of `save SITE` as a whole (capture, resolve, rewrite)",
        ],
    )
    for name, (description, build) in FIRST_USE.items():
        log(f"first use: {name}")
        colds, warms, compiles = [], [], []
        for _ in range(_fresh_repeats(config)):
            with tempfile.TemporaryDirectory() as cache:
                cold, _ = _fresh_process(build, cache)
                warm, compile_seconds = _fresh_process(build, cache)
            colds.append(cold)
            warms.append(warm)
            compiles.append(compile_seconds)
        cold, warm = statistics.median(colds), statistics.median(warms)
        section.add(
            model=description,
            **{
                "cache cold": round(cold * 1000),
                "cache warm": round(warm * 1000),
                "warm / cold": round(warm / cold, 3),
                "compile, cache warm": round(statistics.median(compiles) * 1000),
            },
        )
    return section


def _fresh_process(build: str, cache: str) -> tuple[float, float]:
    """(capture seconds, compile seconds) of a compile in a new process using the cache in `cache`."""
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "TDHOOK_FX_CAPTURE_CACHE_DIR": cache, "TDHOOK_FX_CAPTURE_CACHE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS.format(build=build)], cwd=root, env=environment,
        capture_output=True, text=True, check=True,
    )
    capture_seconds, compile_seconds = map(float, done.stdout.strip().splitlines()[-1].split())
    return capture_seconds, compile_seconds


def _fresh_repeats(config: Config) -> int:
    return 1 if config.quick else 3


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
