"""Workflow: tdhook 0.3.0's results, with consecutive read-only methods fused into one compiled pass."""

from __future__ import annotations

import copy

import pytest
import torch
from tdhook import latent as tdhook_latent
from tdhook import workflow as tdhook_workflow
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from tdhook_fx import latent, workflow, zoo
from tdhook_fx.compiler import call_path, compiled
from tdhook_fx.errors import InvalidArgument
from tests.methods.helpers import assert_same_tensordict


@pytest.fixture
def mlp(mlp):
    """A copy of the session's model per test: a module compiled on the shared model by an earlier
    test has its generated call bound to the runner already, and `graph_runs` would not see it."""
    return zoo.Sample(copy.deepcopy(mlp.model), mlp.example.clone())


class Recorder:
    """A probe that keeps what it was given."""

    def __init__(self):
        self.values = []

    def step(self, data, **kwargs):
        self.values.append(data.detach().clone())


def graph_runs(monkeypatch) -> list:
    """Counts the compiled graphs' eager runs (each is one pass of the model), on the generated
    call path and the general one alike: both run the graph through `runner_of`."""
    runs = []
    original = call_path.runner_of

    class Counted:
        def __init__(self, variant):
            self.variant, self.graph = variant, original(variant)

        def forward(self, *inputs):
            runs.append(self.variant)
            return self.graph.forward(*inputs)

    monkeypatch.setattr(call_path, "runner_of", Counted)
    monkeypatch.setattr(compiled, "runner_of", Counted)
    return runs


def steps(lib, probes):
    summary = TensorDictModule(lambda acts: acts.sum(-1), in_keys=[("acts", "first", "0")], out_keys=["summary"])
    return [
        lib.ActivationCaching(r"^0$", cache_key=("acts", "first")),
        lib.ActivationCaching(r"^2$", cache_key=("acts", "second")),
        lib.Probing(r"^1$", lambda key, direction: probes.setdefault(key, Recorder())),
        summary,
    ]


def test_read_only_methods_fuse_into_one_pass_with_tdhooks_results(mlp, monkeypatch):
    expected_probes, probes = {}, {}
    expected = tdhook_workflow.Workflow(*steps(tdhook_latent, expected_probes))(mlp.model, mlp.example.clone())
    runs = graph_runs(monkeypatch)
    flow = workflow.Workflow(*steps(latent, probes))
    got = flow(mlp.model, mlp.example.clone())
    assert_same_tensordict(expected, got)
    torch.testing.assert_close(probes["1"].values, expected_probes["1"].values)
    assert len(runs) == 1  # tdhook: three passes
    assert flow.program.splitlines() == [
        "# pass 1: 0:ActivationCaching, 1:ActivationCaching, 2:Probing",
        "save 0 as saved_0",
        "save 2 as saved_1",
        "save 1 as saved_2",
    ]


def test_an_intervention_keeps_its_own_pass_so_later_reads_see_the_plain_model(mlp, monkeypatch):
    def make(lib):
        return [
            lib.SteeringVectors(["0"], lambda module_key, output: output + 10),
            lib.ActivationCaching(r"^2$", cache_key="after"),
        ]

    expected = tdhook_workflow.Workflow(*make(tdhook_latent))(mlp.model, mlp.example.clone())
    runs = graph_runs(monkeypatch)
    got = workflow.Workflow(*make(latent))(mlp.model, mlp.example.clone())
    assert_same_tensordict(expected, got)
    assert len(runs) == 2


def test_owned_outputs_need_a_workflow_update_as_in_tdhook(mlp):
    first = latent.ActivationCaching("0", cache_key=("acts", "shared"))
    second = latent.ActivationCaching("2", cache_key=("acts", "shared"))
    with pytest.raises(InvalidArgument, match="WorkflowUpdate"):
        workflow.Workflow(first, second)(mlp.model, mlp.example.clone())
    result = workflow.Workflow(first, workflow.WorkflowUpdate(second))(mlp.model, mlp.example.clone())
    assert set(result["acts", "shared"].keys()) == {"2"}


def test_missing_keys_are_refused_before_anything_runs(mlp, monkeypatch):
    runs = graph_runs(monkeypatch)
    consumer = TensorDictModule(lambda x: x, in_keys=["absent"], out_keys=["y"])
    with pytest.raises(ValueError, match="missing TensorDict keys"):
        workflow.Workflow(latent.ActivationCaching("0"), consumer)(mlp.model, mlp.example.clone())
    assert runs == []


def test_shared_memory_outputs_are_written_in_place(mlp):
    data = TensorDict({"input": mlp.example["input"], "output": torch.zeros(4, 2)}, batch_size=[4]).share_memory_()
    result = workflow.Workflow(latent.ActivationCaching("0", cache_key=None))(mlp.model, data)
    assert result is data and data.is_shared()
    torch.testing.assert_close(data["output"], mlp.model(mlp.example["input"]))
