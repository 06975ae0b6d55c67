"""TaskVectors: tdhook 0.3.0's vectors, alpha and outputs, from a weight edit in the compiled graph."""

from __future__ import annotations

import pytest
import torch
from tdhook.weights.task_vectors import TaskVectors as TdhookTaskVectors
from tensordict import TensorDict
from torch import nn

from tdhook_fx import zoo
from tdhook_fx.errors import MethodUsageError
from tdhook_fx.methods.programs import PROGRAMS
from tdhook_fx.weights import TaskVectors


def models(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def run(method, pretrained, finetuned, td):
    with method.prepare(pretrained) as hooked:
        tau = hooked.get_task_vector(finetuned)
        forget = hooked.get_forget_vector(finetuned)
        alpha = hooked.hooking_context.compute_alpha(tau)
        weights = hooked.get_weights(tau, alpha=0.3)
        with hooked.with_applied_vectors(tau, forget, alpha=0.7):
            both = hooked(td.clone())["output"]
        with hooked.with_applied_vectors(tau, alpha=alpha):
            best = hooked(td.clone())["output"]
        plain = hooked(td.clone())["output"]
    return tau, alpha, weights, both, best, plain


def test_vectors_alpha_and_applied_weights_match_tdhook():
    pretrained, finetuned = models(0), models(1)
    td = TensorDict(input=torch.randn(5, 6), batch_size=[5])

    def accuracy(module):
        return float(module(td.clone())["output"][:, 0].mean().detach())

    def adequate(module):
        return float(module(td.clone())["output"].abs().max().detach()) < 10

    settings = dict(alphas=[-1.0, 0.2, 0.5, 1.0, 2.0], get_test_accuracy=accuracy, get_control_adequacy=adequate)
    expected = run(TdhookTaskVectors(**settings), pretrained, finetuned, td)
    compilations = PROGRAMS.compilations
    got = run(TaskVectors(**settings), pretrained, finetuned, td)
    assert got[1] == expected[1]
    for theirs, ours in zip(expected, got):
        if isinstance(theirs, TensorDict):
            assert set(ours.keys(True, True)) == set(theirs.keys(True, True))
            for key in theirs.keys(True, True):
                torch.testing.assert_close(ours[key], theirs[key])
        elif isinstance(theirs, torch.Tensor):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    # the alpha sweep and both applications share one program: plain + applied = 2 compilations at most
    assert PROGRAMS.compilations - compilations <= 2


def test_the_model_weights_are_never_written():
    pretrained, finetuned = models(0), models(1)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    method = TaskVectors([1.0], lambda m: 1.0, lambda m: True)
    with method.prepare(pretrained) as hooked:
        with hooked.with_applied_vectors(hooked.get_task_vector(finetuned), alpha=1.0):
            hooked(TensorDict(input=torch.randn(2, 6), batch_size=[2]))
            assert hooked.applied_program.splitlines()[0] == "steer 0.weight += $task_alpha_0 * $task_vector_0"
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, before[key])


def test_tied_weights_are_edited_at_each_use_as_tdhook_loads_them():
    sample, finetuned = zoo.gpt2(n_layer=1, n_embd=16, n_head=2), zoo.gpt2(n_layer=1, n_embd=16, n_head=2)
    with torch.no_grad():
        for p in finetuned.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    td = sample.example
    keys = dict(in_keys=["input_ids"], out_keys=["logits"])
    outputs = []
    for method in (TdhookTaskVectors([1.0], lambda m: 1.0, lambda m: True), TaskVectors([1.0], lambda m: 1.0, lambda m: True)):
        with method.prepare(sample.model, **keys) as hooked:
            with hooked.with_applied_vectors(hooked.get_task_vector(finetuned.model), alpha=0.5):
                outputs.append(hooked(td.clone())["logits"])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)


def test_compute_alpha_needs_the_context_and_an_adequate_value():
    method = TaskVectors([1.0], lambda m: 1.0, lambda m: False)
    context = method.prepare(models())
    with pytest.raises(MethodUsageError, match="outside of context"):
        context.compute_alpha(TensorDict())
    with context as hooked, pytest.raises(MethodUsageError, match="No value satisfies"):
        context.compute_alpha(hooked.get_task_vector(models(1)))
