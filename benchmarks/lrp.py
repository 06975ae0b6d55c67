"""LRP: tdhook_fx (rules compiled into the graph) against tdhook 0.3.0 and zennit, per call.

Workloads (random weights, eval mode), relevance of one class per example, EpsilonPlus rules
(z+ for convolutions, epsilon for linear layers, batch norm and activations passing relevance):
- MLP: 6 Linear layers of width 512 with ReLUs, batch 64;
- CNN: four 3x3 convolutions (32, 32, 64, 64 channels) with batch norm, ReLU and max-pooling,
  a linear head, batch 16 of 3x32x32 images;
- block: the tests' transformer block (AttnLRP rules, LayerNorm passing relevance: tdhook's LayerNorm
  rule differs) at width 64, 4 heads, 32 tokens, batch 8
  (zennit has no rules for it).

tdhook_fx and tdhook run in this process, each paired round by round with the plain model's
forward + backward (the gradient); their relevances are checked equal first. zennit cannot be
imported here (it imports torchvision, whose wheels do not load with this CPU torch), so it runs
in the reference environment (REFERENCE_PYTHON, see tests/attribution/lrp/references.py) with
its own plain-model baseline: its row compares the ratios to the plain model of each process.

Run: `python benchmarks/lrp.py [--rounds N]`; prints a table and writes
benchmarks/results/lrp.json. One torch thread (as the other benchmark families).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASS = 1
REFERENCE_PYTHON = os.environ.get("REFERENCE_PYTHON", "/tmp/refenv/bin/python")


# ---- workloads (plain torch: the zennit side builds them too) ------------------------------------


def mlp_workload():
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [nn.Linear(512 if i else 256, 512 if i < 5 else 10)] + ([nn.ReLU()] if i < 5 else [])
    return nn.Sequential(*layers).eval(), torch.randn(64, 256)


def cnn_workload():
    torch.manual_seed(0)

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *conv(3, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    ).eval()
    return model, torch.randn(16, 3, 32, 32)


def block_workload():
    from tests.attribution.lrp.models import Block

    torch.manual_seed(0)
    return Block(width=64, heads=4, classes=10).eval(), torch.randn(8, 32, 64)


WORKLOADS = {"MLP 6x512, batch 64": mlp_workload, "CNN 4 conv + BN, batch 16": cnn_workload, "block w64 t32, batch 8": block_workload}
ZENNIT_WORKLOADS = ("MLP 6x512, batch 64", "CNN 4 conv + BN, batch 16")


def plain_gradient(model, x):
    def run():
        leaf = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(leaf)[:, CLASS].sum(), leaf)[0]

    return run


def timed(candidates: dict, rounds: int, target_seconds: float = 0.2) -> dict:
    """Median seconds per call of each candidate, over interleaved rounds (each round runs every
    candidate for about `target_seconds`, keeping the faster of two batches)."""
    counts = {}
    for name, fn in candidates.items():
        fn()
        start = time.perf_counter()
        fn()
        counts[name] = max(1, int(target_seconds / max(time.perf_counter() - start, 1e-6)))
    found = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                for _ in range(counts[name]):
                    fn()
                best = min(best, (time.perf_counter() - start) / counts[name])
            found[name].append(best)
    return {name: statistics.median(times) for name, times in found.items()}


# ---- zennit, in the reference environment ---------------------------------------------------------


def zennit_times(rounds: int) -> dict:
    from zennit.attribution import Gradient
    from zennit.composites import LAYER_MAP_BASE, LayerMapComposite
    from zennit.rules import Epsilon, Pass, ZPlus
    from zennit.types import BatchNorm, Convolution

    found = {}
    for name in ZENNIT_WORKLOADS:
        model, x = WORKLOADS[name]()
        composite = LayerMapComposite([(BatchNorm, Pass()), *LAYER_MAP_BASE, (Convolution, ZPlus()), (torch.nn.Linear, Epsilon())])
        output_class = model(x).shape[-1]
        one_hot = torch.nn.functional.one_hot(torch.full((len(x),), CLASS), output_class).float()
        attributor = Gradient(model, composite)
        attributor.__enter__()

        def zennit(attributor=attributor, x=x, one_hot=one_hot):
            return attributor(x.clone(), one_hot)[1]

        # the plain gradient measured with the composite removed, in the same process
        times = timed({"zennit": zennit}, rounds)
        attributor.__exit__(None, None, None)
        times.update(timed({"plain": plain_gradient(model, x)}, rounds))
        found[name] = times
    return found


# ---- tdhook_fx and tdhook, here --------------------------------------------------------------------


def in_process_times(rounds: int) -> dict:
    from tdhook.attribution import LRP as TdhookLRP
    from tdhook.attribution.lrp_helpers import rules as tdhook_rules
    from tensordict import TensorDict

    from tdhook_fx.attribution.lrp import LRP
    from tdhook_fx.attribution.lrp_helpers import rules
    from tests.attribution.lrp.helpers import attn_lrp

    def target(outputs, _):
        return TensorDict(t=outputs["output"][..., CLASS], batch_size=outputs.batch_size)

    found = {}
    for name, build in WORKLOADS.items():
        model, x = build()
        mapper = attn_lrp(layer_norm=False) if name.startswith("block") else (lambda r: r.EpsilonPlus())  # tdhook's LayerNorm rule differs
        contexts = {
            "tdhook_fx": LRP(rule_mapper=mapper(rules), skip_modules=LRP.default_skip, init_attr_targets=target),
            "tdhook": TdhookLRP(rule_mapper=mapper(tdhook_rules), skip_modules=TdhookLRP.default_skip, init_attr_targets=target),
        }
        # tdhook replaces the forward of the modules while its context is open: it gets its own copy
        models = {"tdhook_fx": model, "tdhook": copy.deepcopy(model)}
        hooked = {label: method.prepare(models[label]).__enter__() for label, method in contexts.items()}
        td = TensorDict(input=x, batch_size=[len(x)])
        ours, theirs = (hooked[label](td.clone())["attr", "input"] for label in ("tdhook_fx", "tdhook"))
        difference = (ours - theirs).abs().max().item()
        candidates = {"plain": plain_gradient(model, x)}
        candidates.update({label: (lambda h=h, td=td: h(td.clone())) for label, h in hooked.items()})
        times = timed(candidates, rounds)
        times["max |diff|"] = difference
        found[name] = times
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--zennit", action="store_true", help="(internal) time zennit; run in the reference environment")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.zennit:
        print(json.dumps(zennit_times(args.rounds)))
        return 0
    here = in_process_times(args.rounds)
    zennit = {}
    if Path(REFERENCE_PYTHON).exists():
        run = subprocess.run([REFERENCE_PYTHON, __file__, "--zennit", "--rounds", str(args.rounds)], capture_output=True, text=True, check=True)
        zennit = json.loads(run.stdout.strip().splitlines()[-1])
    rows = []
    print("| workload | plain fwd+bwd s | tdhook_fx s | tdhook s | zennit s (its process) | tdhook_fx / plain | tdhook / plain | zennit / plain | tdhook_fx vs tdhook | tdhook_fx vs zennit | max abs diff vs tdhook |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, times in here.items():
        ours, theirs = times["tdhook_fx"] / times["plain"], times["tdhook"] / times["plain"]
        row = {"workload": name, **times, "tdhook_fx/plain": ours, "tdhook/plain": theirs, "tdhook_fx vs tdhook": ours / theirs}
        z = zennit.get(name)
        if z:
            row.update({"zennit": z["zennit"], "zennit plain": z["plain"], "zennit/plain": z["zennit"] / z["plain"],
                        "tdhook_fx vs zennit": ours / (z["zennit"] / z["plain"])})
        rows.append(row)
        zs = f"{z['zennit']:.4f}" if z else "-"
        zr = f"{row['zennit/plain']:.2f}" if z else "-"
        zv = f"{row['tdhook_fx vs zennit']:.2f}" if z else "-"
        print(f"| {name} | {times['plain']:.4f} | {times['tdhook_fx']:.4f} | {times['tdhook']:.4f} | {zs} | {ours:.2f} | {theirs:.2f} | {zr} | "
              f"{ours / theirs:.2f} | {zv} | {times['max |diff|']:.1e} |")
    print(f"- median of {args.rounds} interleaved rounds, 1 torch thread, seconds per call; ratios below 1: tdhook_fx is faster")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "lrp.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
