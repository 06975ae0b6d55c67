"""IntegratedGradients: tdhook_fx against captum and tdhook 0.3.0, timed in the same process.

Workloads (random weights, eval mode):
- small MLP: 4 Linear layers of width 64, batch 8 (where per-call overhead dominates);
- MLP: 10 Linear layers of width 1000 with ReLUs, batch 100;
- CNN: four 3x3 convolutions (32 and 64 channels) with ReLUs and pooling, then a linear head,
  batch 16 of 3x32x32 images;
each with n_steps 16 and 50 (Gauss-Legendre, attributions multiplied by input - baseline),
and two kinds of targets:
- "label": one target per example (its label's logit; captum's `target=labels`);
- "3 classes": three classes attributed separately (three attributions per example): captum
  and tdhook take one call per class; tdhook_fx takes one call with `per_target=True`, which
  runs the forward pass once and one backward pass per class.

Every candidate's attributions are checked against captum's before it is timed. Times are
medians over interleaved rounds (in a round, each candidate in turn makes enough calls to take
about 0.2 s, at least one); ratios are tdhook_fx's time over captum's and over tdhook's (below
1: tdhook_fx is faster).

Run: `python benchmarks/attribution.py [--quick] [--rounds N] [--threads N]`; prints a table
and writes benchmarks/results/attribution.json. One torch thread by default, as the other
benchmark families: on a small shared machine, two threads that lose their core to another
process make every parallel region wait (calls of milliseconds took 100 ms), which measures
the scheduler, not the libraries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: python benchmarks/attribution.py
    sys.path.insert(0, str(ROOT))

from benchmarks.common import Config, Section, log, machine, setup_process

CLASSES = (0, 1, 2)


# ---- workloads ----------------------------------------------------------------------------------


def mlp(width: int = 1000, depth: int = 10, batch: int = 100) -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width if i < depth - 1 else 10))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval(), torch.randn(batch, width)


def cnn(batch: int = 16, size: int = 32) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    return model.eval(), torch.randn(batch, 3, size, size)


# ---- targets, as each library takes them ----------------------------------------------------------


def by_label(outputs: TensorDict, additional: TensorDict) -> TensorDict:
    label = additional["label"].reshape(-1, *[1] * (outputs.batch_dims - 1)).expand(outputs.batch_size)
    return TensorDict(logit=outputs["output"].gather(-1, label.unsqueeze(-1)).squeeze(-1), batch_size=outputs.batch_size)


def one_class(c: int):
    def target(outputs: TensorDict, _additional) -> TensorDict:
        return TensorDict(logit=outputs["output"][..., c], batch_size=outputs.batch_size)

    return target


def every_class(outputs: TensorDict, _additional) -> TensorDict:
    logits = outputs["output"]
    return TensorDict({f"c{c}": logits[..., c] for c in CLASSES}, batch_size=outputs.batch_size)


# ---- candidates -----------------------------------------------------------------------------------


def candidates(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, n_steps: int, targets: str) -> dict:
    """name -> (call, attributions from its result as a list of tensors)."""
    import captum.attr
    import tdhook.attribution

    import tdhook_fx.attribution

    baseline = torch.zeros_like(x)
    td = TensorDict({"input": x, ("baseline", "input"): baseline, "label": labels}, batch_size=[len(x)])
    common = {"n_steps": n_steps, "method": "gausslegendre", "multiply_by_inputs": True}
    captum_ig = captum.attr.IntegratedGradients(model)
    opened = []

    def entered(method):
        context = method.prepare(model)
        opened.append(context)
        return context.__enter__()

    if targets == "label":
        ours = entered(tdhook_fx.attribution.IntegratedGradients(init_attr_targets=by_label, additional_init_keys=["label"], **common))
        theirs = entered(tdhook.attribution.IntegratedGradients(init_attr_targets=by_label, additional_init_keys=["label"], **common))
        found = {
            "captum": (lambda: captum_ig.attribute(x, baselines=baseline, target=labels, n_steps=n_steps), lambda r: [r]),
            "tdhook": (lambda: theirs(td.clone(recurse=False)), lambda r: [r["attr", "input"]]),
            "tdhook_fx": (lambda: ours(td.clone(recurse=False)), lambda r: [r["attr", "input"]]),
        }
    else:
        ours = entered(tdhook_fx.attribution.IntegratedGradients(init_attr_targets=every_class, per_target=True, **common))
        theirs = [entered(tdhook.attribution.IntegratedGradients(init_attr_targets=one_class(c), **common)) for c in CLASSES]
        found = {
            "captum": (
                lambda: [captum_ig.attribute(x, baselines=baseline, target=c, n_steps=n_steps) for c in CLASSES],
                lambda r: r,
            ),
            "tdhook": (lambda: [h(td.clone(recurse=False)) for h in theirs], lambda r: [t["attr", "input"] for t in r]),
            "tdhook_fx": (lambda: ours(td.clone(recurse=False)), lambda r: [r["attr", f"c{c}", "input"] for c in CLASSES]),
        }
    return found


def check(found: dict) -> dict[str, float]:
    """Run each candidate once (the warm-up) and compare its attributions with captum's."""
    results = {name: pick(call()) for name, (call, pick) in found.items()}
    reference = results["captum"]
    errors = {}
    for name, attributions in results.items():
        scale = max(float(r.abs().max()) for r in reference)
        error = max(float((a - r).abs().max()) for a, r in zip(attributions, reference))
        if error > 1e-4 * scale + 1e-6:
            raise AssertionError(f"{name} disagrees with captum by {error:.3g} (attributions up to {scale:.3g})")
        errors[name] = error
    return errors


def measure(found: dict, rounds: int, batch_seconds: float = 0.2) -> dict[str, float]:
    """Seconds per call: the median over interleaved rounds; a round times enough calls to take
    about `batch_seconds` (one call for the slow workloads)."""
    counts = {}
    for name, (call, _) in found.items():
        start = time.perf_counter()
        call()
        counts[name] = max(1, int(batch_seconds / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(rounds):
        for name, (call, _) in found.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                call()
            samples[name].append((time.perf_counter() - start) / counts[name])
    return {name: statistics.median(values) for name, values in samples.items()}


# ---- the run --------------------------------------------------------------------------------------


def run(config: Config) -> list[Section]:
    """The IntegratedGradients family, for `benchmarks/run.py` (each call takes seconds: at most 5 rounds)."""
    rounds = 1 if config.quick else min(config.rounds, 5)
    workloads = {
        "small MLP 64x4, batch 8": lambda: mlp(64, 4, 8),
        "MLP 1000x10, batch 100": (lambda: mlp(256, 4, 16)) if config.quick else mlp,
        "CNN 4 conv, batch 16 (3x32x32)": (lambda: cnn(4, 16)) if config.quick else cnn,
    }
    section = Section(
        "IntegratedGradients: tdhook_fx time / captum's and / tdhook's (below 1: faster)",
        ["workload", "n_steps", "targets", "captum s", "tdhook s", "tdhook_fx s", "vs captum", "vs tdhook", "max |diff|"],
    )
    for label, build in workloads.items():
        torch.manual_seed(0)
        model, x = build()
        labels = torch.arange(len(x)) % 10
        for n_steps in (16, 50):
            for targets in ("label", "3 classes"):
                found = candidates(model, x, labels, n_steps, targets)
                errors = check(found)
                times = measure(found, rounds)
                section.add(
                    workload=label, n_steps=n_steps, targets=targets,
                    **{"captum s": round(times["captum"], 4), "tdhook s": round(times["tdhook"], 4), "tdhook_fx s": round(times["tdhook_fx"], 4)},
                    **{"vs captum": round(times["tdhook_fx"] / times["captum"], 3), "vs tdhook": round(times["tdhook_fx"] / times["tdhook"], 3)},
                    **{"max |diff|": f"{max(errors.values()):.1e}"},
                )
                log(f"{label}, n_steps {n_steps}, {targets}: {times}")
    section.notes.append(
        f"median of {rounds} interleaved rounds, {torch.get_num_threads()} torch thread(s), seconds per call; "
        "max |diff|: the largest difference from captum's attributions"
    )
    return [section]


def main() -> None:
    parser = argparse.ArgumentParser(description="IntegratedGradients: tdhook_fx vs captum vs tdhook")
    parser.add_argument("--quick", action="store_true", help="small models, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attribution.json")
    args = parser.parse_args()
    setup_process()
    sections = run(Config(rounds=args.rounds, quick=args.quick))
    info = machine()
    print(json.dumps(info))
    for section in sections:
        print(section.render())
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "sections": [s.to_json() for s in sections]}, indent=2))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
