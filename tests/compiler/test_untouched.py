"""Compiling and running never changes the user's model: weights, buffers, hooks, mode."""

import pytest
import torch

import tdhook_fx

PROGRAMS = {
    "mlp": "save 0\nsteer 2 += 1\nprune 0.weight 50%\nset 4[:, 0] = 0",
    "cnn": "save 1\nprune 0.weight 30% along 0\nsteer 5 *= 2",
    "gpt2": "save transformer.h[*].mlp\nprune lm_head.weight 50%\nsteer transformer.h[1].mlp += 1",
}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("training", [False, True])
def test_model_is_untouched(name, training, samples):
    sample = samples(name)
    model = sample.model
    model.train(training)
    try:
        before = snapshot(model)
        hooks = hook_count(model)
        compiled = tdhook_fx.compile(model, PROGRAMS[name], example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
        if not training:  # in training mode, running updates batch-norm statistics, as eager does
            compiled(sample.example.clone())
        after = snapshot(model)
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), key
        assert hook_count(model) == hooks
        assert model.training is training
    finally:
        model.eval()
