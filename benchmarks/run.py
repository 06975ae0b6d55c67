"""Run every benchmark family, print the tables, and write benchmarks/results/latest.json.

    python benchmarks/run.py            # everything (about 10 minutes on one CPU thread)
    python benchmarks/run.py --quick    # a smoke run: fewer rounds, no inductor compilation
    python benchmarks/run.py --only overhead sweep
    python benchmarks/run.py --only overhead --models mlp

Every number is a ratio against the plain model (or a named baseline) measured in the same
process, paired with it round by round, on one CPU thread (see benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Config, Section, log, machine, setup_process

FAMILIES = {
    "overhead": "benchmarks.overhead",
    "compile": "benchmarks.compile_time",
    "sweep": "benchmarks.patching_sweep",
    "torch_compile": "benchmarks.torch_compile",
    "attribution": "benchmarks.attribution",
    "workflow": "benchmarks.workflow",
}
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no inductor (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=list(FAMILIES), help="run only these families")
    parser.add_argument("--models", nargs="+", choices=["gpt2", "mlp"], help="run only these workloads")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 21; quick: 5)")
    parser.add_argument(
        "--output", type=Path, help="where to write the JSON (default: results/latest.json for a full run; "
        "a --quick or --only run writes nothing unless given one)"
    )
    args = parser.parse_args(argv)

    setup_process()
    config = Config(quick=args.quick, models=tuple(args.models) if args.models else None)
    config.rounds = args.rounds or (5 if args.quick else config.rounds)
    info = machine()
    started = time.perf_counter()
    sections: list[Section] = []
    for family in args.only or list(FAMILIES):
        log(f"== {family}")
        sections.extend(_run_family(importlib.import_module(FAMILIES[family]), config))
    sections.append(targets(sections))
    info["seconds"] = round(time.perf_counter() - started, 1)

    text = render(info, config, sections)
    print(text)
    output = args.output or (None if args.quick or args.only else RESULTS / "latest.json")
    if output is None:
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "config": {"rounds": config.rounds, "repeats": config.repeats, "target_seconds": config.target_seconds, "quick": config.quick},
        "sections": [s.to_json() for s in sections],
    }
    output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    output.with_suffix(".md").write_text(text + "\n")
    log(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


def _run_family(module, config: Config) -> list[Section]:
    """A family's `run(config)` returns its Sections (or dicts of Section fields)."""
    sections = module.run(config)
    return [s if isinstance(s, Section) else Section(**s) for s in sections]


def render(info: dict, config: Config, sections: list[Section]) -> str:
    lines = [
        "# tdhook_fx benchmarks",
        "",
        (
            f"Machine: {info['cpu']} ({info['cores']} cores), torch threads: {info['torch_threads']}, "
            f"Python {info['python']}, torch {info['torch']}, tensordict {info['tensordict']}, "
            f"transformers {info['transformers']}, tdhook {info['tdhook']}, nnsight {info['nnsight']}; "
            f"load average at the start {info.get('load_average')}; run took {info['seconds']} s."
        ),
        (
            f"Timing: ratios are medians over {config.rounds} rounds of a candidate's time / the baseline's, "
            f"measured back to back (each the best of {config.repeats} batches of ~"
            f"{config.target_seconds * 1000:.0f} ms){' - QUICK RUN' if config.quick else ''}."
        ),
    ]
    for section in sections:
        lines += ["", section.render()]
    return "\n".join(lines)


# ---- the targets, read off the tables ----------------------------------------------------


def targets(sections: list[Section]) -> Section:
    section = Section("Targets", ["target", "measured", "met"])

    def find(title_part: str):
        return next((s for s in sections if title_part in s.title), None)

    def cell(s: Section | None, column: str, **match):
        if s is None:
            return None
        for row in s.rows:
            if all(row.get(k) == v for k, v in match.items()):
                return row.get(column)
        return None

    def add(target: str, value, ok):
        met = "n/a" if not isinstance(value, (int, float)) else ("yes" if ok(value) else "no")
        section.add(target=target, measured=value, met=met)

    gpt2 = find("Eager overhead per forward: GPT-2")
    mlp = find("Eager overhead per forward: MLP")
    for operation in ("save-all", "steer"):
        add(f"eager {operation}, GPT-2, tensors <= 1.02x", cell(gpt2, "tdhook_fx (tensors)", intervention=operation), lambda v: v <= 1.02)
        add(f"eager {operation}, MLP, tensors <= 1.10x", cell(mlp, "tdhook_fx (tensors)", intervention=operation), lambda v: v <= 1.10)
    add("fused patch at layer 1 of 4 <= 1.55x", cell(gpt2, "tdhook_fx (tensors)", intervention="patch"), lambda v: v <= 1.55)
    sweep = find("Patching sweep")
    if sweep is not None:
        column = next(c for c in sweep.columns if c.startswith("time /"))
        add("sweep <= 0.6x of 128 plain forwards", cell(sweep, column, method="tdhook_fx.perf.sweep"), lambda v: v <= 0.6)
    compile_section = find("Compile time")
    add(
        "new program on a cached GPT-2 capture <= 50 ms",
        cell(compile_section, "new program on the cached capture", model="GPT-2-style"),
        lambda v: v <= 50,
    )
    first_use = find("First use")
    for model in ("GPT-2 small config (12 x 768), example 1 x 16 tokens", "all-MiniLM-L6-v2 (pretrained), 2 sentences with their mask"):
        add(f"capture of a model seen before, {model.split(' (')[0]} <= 500 ms", cell(first_use, "cache warm", model=model), lambda v: v <= 500)
    compiled = find("torch.compile")
    if compiled is not None:
        ours = [r for r in compiled.rows if str(r.get("variant", "")).startswith("tdhook_fx")]
        breaks = [r.get("graph breaks") for r in ours]
        add("0 graph breaks (tdhook_fx rows, save grad included)", max((b for b in breaks if isinstance(b, int)), default=None), lambda v: v == 0)
        recompiles = [r.get("recompiles on value changes") for r in ours]
        add("0 recompiles on value changes", max((r for r in recompiles if isinstance(r, int)), default=None), lambda v: v == 0)
        for model in dict.fromkeys(r.get("model") for r in ours):
            # a patch also runs the source up to the patched layer: it is not held to a plain forward
            steady = [
                r.get("steady time / compiled plain")
                for r in ours
                if r.get("model") == model and "patch" not in str(r.get("variant"))
            ]
            add(
                f"compiled steady time <= 1.05x compiled plain, {model} (worst of steer, save-all)",
                max((v for v in steady if isinstance(v, float)), default=None),
                lambda v: v <= 1.05,
            )
    return section


if __name__ == "__main__":
    raise SystemExit(main())
