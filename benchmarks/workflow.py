"""A Workflow of read-only methods: tdhook runs one pass of the model per method, tdhook_fx one in all.

The workflow, on a GPT-2-style model (a TensorDictModule reading `input_ids`):
    ActivationCaching of every block's MLP output,
    Probing of block 1's MLP output (a probe that keeps a running mean),
    ActivationCaching of a Target (16 units of block 2's MLP: the read a steering vector is made from),
    a TensorDictModule averaging that read into a vector.
Both libraries' results are checked equal first. Passes are counted as the model's forward calls
(tdhook) and the compiled graph's runs (tdhook_fx); times are ratios against one plain forward.

    python benchmarks/workflow.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from tensordict.nn import TensorDictModule

from benchmarks.common import Config, Section, log, paired_ratios, setup_process


class MeanProbe:
    """A probe that keeps the running mean of what it sees."""

    def __init__(self):
        self.count, self.total = 0, None

    def step(self, data, **kwargs):
        data = data.detach().mean(0)
        self.total = data if self.total is None else self.total + data
        self.count += 1


def steps(latent, Target, probes: dict):
    return [
        latent.ActivationCaching(r"module\.transformer\.h\.\d+\.mlp$", cache_key=("acts", "mlp")),
        latent.Probing(r"module\.transformer\.h\.1\.mlp$", lambda key, direction: probes.setdefault(key, MeanProbe())),
        latent.ActivationCaching(Target("transformer.h.2.mlp", "activation", -1, tuple(range(16))), cache_key=("steer", "read")),
        TensorDictModule(lambda read: read.mean(-2), in_keys=[("steer", "read", "transformer.h.2.mlp")], out_keys=[("steer", "vector")]),
    ]


def counting_passes(model: torch.nn.Module):
    """A counter of the model's forward calls (tdhook runs the model itself once per pass)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def counting_graph_runs(compiled_class, call) -> list:
    """The compiled graphs' runs during `call()` (each one pass of the model)."""
    runs = []
    original = compiled_class._run_graph

    def counted(self, *inputs):
        runs.append(self)
        return original(self, *inputs)

    compiled_class._run_graph = counted
    try:
        call()
    finally:
        compiled_class._run_graph = original
    return runs


def run(config: Config) -> list[Section]:
    import tdhook.latent as tdhook_latent
    from tdhook.targets import Target as TdhookTarget
    from tdhook.workflow import Workflow as TdhookWorkflow

    import tdhook_fx.latent as fx_latent
    from tdhook_fx import zoo
    from tdhook_fx.compiler.compiled import CompiledModule
    from tdhook_fx.targets import Target
    from tdhook_fx.workflow import Workflow

    section = Section(
        "Workflow of read-only methods: one fused pass (tdhook: one pass per method)",
        ["model", "library", "model passes", "seconds", "x plain forward"],
        notes=[
            "steps: ActivationCaching (every MLP), Probing (block 1's MLP), ActivationCaching of a Target (16 units "
            "of block 2's MLP), a TensorDictModule averaging it; results checked equal first",
            "model passes: tdhook, forward calls of the model; tdhook_fx, runs of the compiled graph",
        ],
    )
    for name, sample in (("gpt2 4x64, batch 2x8", zoo.gpt2()), ("gpt2 4x64, batch 16x64", zoo.gpt2(batch=16, seq=64))):
        log(f"workflow: {name}")
        model = TensorDictModule(sample.model, in_keys=["input_ids"], out_keys=["logits"])
        ids = sample.example["input_ids"]
        peers = {
            "tdhook": TdhookWorkflow(*steps(tdhook_latent, TdhookTarget, {})),
            "tdhook_fx": Workflow(*steps(fx_latent, Target, {})),
        }
        results = {label: flow(model, sample.example.clone()) for label, flow in peers.items()}
        for key in results["tdhook"].keys(include_nested=True, leaves_only=True):
            torch.testing.assert_close(results["tdhook_fx"][key], results["tdhook"][key], rtol=1e-4, atol=1e-5)

        calls, handle = counting_passes(sample.model)
        peers["tdhook"](model, sample.example.clone())
        handle.remove()
        runs = counting_graph_runs(CompiledModule, lambda: peers["tdhook_fx"](model, sample.example.clone()))
        passes = {"tdhook": len(calls), "tdhook_fx": len(runs)}

        timings = paired_ratios(
            lambda: sample.model(ids),
            {label: (lambda flow=flow: flow(model, sample.example.clone())) for label, flow in peers.items()},
            config,
        )
        for label, timing in timings.items():
            section.add(**{"model": name, "library": label, "model passes": passes[label], "seconds": timing.seconds,
                           "x plain forward": timing.ratio})
    print(peers["tdhook_fx"].program)
    return [section]


if __name__ == "__main__":
    setup_process()
    quick = "--quick" in sys.argv
    sections = run(Config(quick=quick, rounds=5 if quick else 21))
    for section in sections:
        print(section.render())
