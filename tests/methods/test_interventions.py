"""optimize_intervention(s): tdhook 0.3.0's optimization, with the value trained through the compiled graph."""

from __future__ import annotations

import torch
from tdhook import interventions as tdhook_interventions
from tdhook.targets import Target as TdhookTarget
from torch import nn

from tdhook_fx import interventions
from tdhook_fx.methods.programs import PROGRAMS
from tdhook_fx.targets import Target


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).eval()


def specs(lib, T):
    def objective(output, value):
        return lib.InterventionObjective((output[:, 0] - 1).square().mean(), {"mean": output.mean()})

    return (
        lib.InterventionSpec(
            T("1", "activation", -1, (0, 2)), objective, "raise output 0", max_steps=6,
            optimizer=lib.OptimizerConfig("adam", 0.1), preservation_regularizer=lambda v, r: (v - r).square().sum() * 0.01,
        ),
        lib.InterventionSpec(
            T("0", "activation", -1, (5,)), lambda output, value: output[:, 1].square().mean(), "lower output 1",
            max_steps=4, optimizer=lib.OptimizerConfig("sgd", 0.2), early_stopping=lib.EarlyStoppingConfig(patience=2),
        ),
    )


def test_the_same_values_history_and_outputs_as_tdhook():
    x = torch.randn(3, 4)
    expected = tdhook_interventions.optimize_interventions(model(), (x,), specs(tdhook_interventions, TdhookTarget))
    compilations = PROGRAMS.compilations
    got = interventions.optimize_interventions(model(), (x,), specs(interventions, Target))
    for theirs, ours in zip(expected.stages, got.stages):
        assert [h.terms.keys() for h in ours.history] == [h.terms.keys() for h in theirs.history]
        losses = [[h.terms["loss"] for h in stage.history] for stage in (theirs, ours)]
        torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-6, rtol=1e-5)
    for theirs, ours in zip(expected.interventions, got.interventions):
        torch.testing.assert_close(ours.value, theirs.value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.output, expected.output, atol=1e-5, rtol=1e-4)
    assert [s.status for s in got.stages] == [s.status for s in expected.stages]
    assert (got.model_passes, got.model_pass_budget) == (expected.model_passes, expected.model_pass_budget)
    # every step of a stage runs one program with the value as a runtime input: a handful of compilations
    assert PROGRAMS.compilations - compilations <= 5


def test_the_value_is_differentiable_through_the_compiled_graph():
    x = torch.randn(2, 4)
    spec = interventions.InterventionSpec(
        Target("1", "activation", -1, (1,)), lambda output, value: output.sum(), "sum", max_steps=1,
        optimizer=interventions.OptimizerConfig("sgd", 1.0),
    )
    result = interventions.optimize_intervention(model(), (x,), spec)
    m = model()
    with torch.no_grad():
        hidden = torch.tanh(m[0](x))
    expected_grad = m[2].weight[:, 1].sum().expand(2, 1)  # d(sum of outputs)/d(unit 1)
    torch.testing.assert_close(result.interventions[0].value, hidden[:, 1:2] - expected_grad)
