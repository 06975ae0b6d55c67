"""tdhook_fx's LRP equals zennit (MLP, CNN with batch norm and pooling), LXT (a transformer block)
and zennit-crp (conditioned on a channel) within 1e-5.

The references were computed in their own environment (references.py says how); the slow test
recomputes them there when it exists (REFERENCE_PYTHON, by default /tmp/refenv/bin/python).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from tdhook_fx.attribution.lrp import LRP
from tdhook_fx.attribution.lrp_helpers import rules
from tdhook_fx.concepts import ChannelConditionedLRP
from tests.attribution.lrp.helpers import MAPPERS, attn_lrp, relevance, target
from tests.attribution.lrp.models import MODELS

HERE = Path(__file__).parent
STORED = HERE / "references.pt"
REFERENCE_PYTHON = Path(os.environ.get("REFERENCE_PYTHON", "/tmp/refenv/bin/python"))
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def model_of(name: str, case: dict, double: bool = False):
    model = MODELS[name]()
    model = model.double() if double else model
    model.load_state_dict(case["state"])
    return model


def ours(name: str, case: dict) -> torch.Tensor:
    source, model_name, rule = name.split("/")
    if source == "zennit":
        return relevance(LRP, rules, MAPPERS[rule], model_of(model_name, case), case["input"])
    if source == "lxt":
        return relevance(LRP, rules, attn_lrp(epsilon=1e-12), model_of(model_name, case, double=True), case["input"])
    channel = int(rule.removeprefix("channel_"))
    conditioned = ChannelConditionedLRP(
        LRP(rule_mapper=rules.EpsilonPlus(), skip_modules=LRP.default_skip, init_attr_targets=target, warn_on_missing_rule=False),
        condition_module="4", gradient_channel_axis=1,
    )
    x = case["input"]
    td = TensorDict({"input": x, ("metrics", "concept_selection", "channel"): torch.full((len(x),), channel),
                     ("metrics", "concept_selection", "direction"): torch.ones(len(x), dtype=torch.long)}, batch_size=[len(x)])
    with conditioned.prepare(model_of(model_name, case)) as hooked:
        return hooked(td)["attributions", "conditioned", "input"].sum(1)  # crp's heatmap sums the channels


def compare(references: dict) -> None:
    for name, case in references.items():
        found = ours(name, case)
        torch.testing.assert_close(found, case["relevance"].to(found.dtype), **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def stored() -> dict:
    return torch.load(STORED, weights_only=True)


@pytest.mark.parametrize("name", sorted(stored()))
def test_equal_to_the_stored_reference(name):
    compare({name: stored()[name]})


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_PYTHON.exists(), reason=f"no reference environment at {REFERENCE_PYTHON} (see references.py)")
def test_equal_to_references_recomputed_in_their_environment(tmp_path):
    path = tmp_path / "references.pt"
    subprocess.run([str(REFERENCE_PYTHON), str(HERE / "references.py"), str(path)], check=True, capture_output=True, timeout=600)
    fresh = torch.load(path, weights_only=True)
    assert set(fresh) == set(stored())
    compare(fresh)
    for name, case in fresh.items():  # the stored file is what the environment computes today
        torch.testing.assert_close(case["relevance"], stored()[name]["relevance"], rtol=1e-6, atol=1e-7)


if __name__ == "__main__":  # print the largest differences
    for name, case in stored().items():
        difference = (ours(name, case) - case["relevance"]).abs().max().item()
        print(f"{name}: max |tdhook_fx - reference| = {difference:.2e}", file=sys.stdout)
