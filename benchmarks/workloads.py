"""The two models the benchmarks run, and the four interventions measured on each.

- "gpt2": Hugging Face `GPT2LMHeadModel`, 4 layers, width 256, 4 heads, vocab 128, random
  weights (`tdhook_fx.zoo.gpt2`), batch 4 x 32 tokens; interventions at block 1 of 4.
- "mlp": `nn.Sequential` of 8 `Linear(64, 64)` without activations, batch 16;
  interventions at layer 1 of 8.

Interventions (the same on every peer):
- save-all: the output of every module whose output is one tensor (GPT-2: 50 modules; MLP: 8);
- steer: add a vector (`$v`, bound once) to the layer's output;
- set: set position 0 of the layer's output to 0 (`set L[:, 0] = 0`);
- patch: replace the layer's output by its value on other inputs (the source).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from tensordict import TensorDict
from torch import nn

import tdhook_fx
from tdhook_fx import reference, zoo

OPERATIONS = ("save-all", "steer", "set", "patch")


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    td: TensorDict  # inputs at in_keys, source inputs at ("patched", in_key)
    in_keys: list
    out_keys: list
    layer: str  # module name of the steered / set / patched layer
    layers: list[str]  # every layer (the sweep's sites)
    vector: torch.Tensor  # the steering vector

    @property
    def save_sites(self) -> list[str]:
        """Module names whose outputs save-all keeps: every module whose output is one tensor with
        the batch dimension (a TensorDict holds only those), in the order the model runs them.
        Listing them captures the model (cached per model), so it is done on first use."""
        if self.name == "mlp":
            return list(self.layers)
        table = tdhook_fx.sites(self.model, example=self.td, in_keys=self.in_keys, out_keys=self.out_keys)
        batch = self.td.batch_size[0]
        sites = [
            s for s in table if s.kind == "out" and s.item is None and s.call == 0 and s.module and s.shape[:1] == (batch,)
        ]
        return [s.module for s in sorted(sites, key=lambda s: s.order)]

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.td[k] for k in self.in_keys)

    @property
    def source(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.td["patched", k] for k in self.in_keys)

    def plain(self):
        """The unmodified model's forward on the inputs, called as its users call it."""
        return self.forward_on(self.inputs)

    def forward_on(self, inputs: tuple):
        if self.name == "gpt2":
            return lambda: self.model(input_ids=inputs[0])
        return lambda: self.model(inputs[0])

    def program(self, operation: str) -> str:
        if operation == "save-all":
            return "\n".join(f"save {site}" for site in self.save_sites)
        if operation == "steer":
            return f"steer {self.layer} += $v"
        if operation == "set":
            return f"set {self.layer}[:, 0] = 0"
        if operation == "patch":
            return f"patch {self.layer}"
        raise ValueError(operation)

    def compile(self, operation: str) -> tdhook_fx.CompiledModule:
        compiled = tdhook_fx.compile(
            self.model, self.program(operation), example=self.td, in_keys=self.in_keys, out_keys=self.out_keys
        )
        if operation == "steer":
            compiled.bind(v=self.vector)
        return compiled

    def reference(self, operation: str) -> dict:
        """What the intervention must produce ({out_key or ("saved", name): tensor})."""
        return reference.run(
            self.model, self.program(operation), self.td, in_keys=self.in_keys, out_keys=self.out_keys,
            values={"v": self.vector},
        )

    def private_copy(self) -> Workload:
        """The same workload on its own copy of the model (same weights), for a peer that installs
        hooks or wraps the model: its hooks must not run in anyone else's forwards."""
        return replace(self, model=copy.deepcopy(self.model))


def gpt2() -> Workload:
    sample = zoo.gpt2(n_layer=4, n_embd=256, n_head=4, batch=4, seq=32)
    td = sample.example.clone()
    td["patched", "input_ids"] = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    layers = [f"transformer.h.{i}" for i in range(4)]
    return Workload(
        "gpt2", "GPT-2-style (HF GPT2LMHeadModel, 4 layers x 256, batch 4 x 32 tokens)", sample.model, td,
        sample.in_keys, sample.out_keys, "transformer.h.1", layers, torch.randn(256),
    )


def mlp() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]).eval()
    td = TensorDict(input=torch.randn(16, 64), batch_size=[16])
    td["patched", "input"] = torch.randn(16, 64)
    layers = [str(i) for i in range(8)]
    return Workload(
        "mlp", "MLP (nn.Sequential of 8 x Linear(64, 64), no activation, batch 16)", model, td,
        ["input"], ["output"], "1", layers, torch.randn(64),
    )


ALL = {"gpt2": gpt2, "mlp": mlp}


def selected(models) -> dict:
    """The workloads named in `models` (all of them when None), by name."""
    return {name: build for name, build in ALL.items() if models is None or name in models}
