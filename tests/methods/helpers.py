"""Helpers shared by the method-layer tests (comparisons with tdhook)."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx import zoo


def other_inputs(sample: zoo.Sample, seed: int = 1) -> dict:
    """Inputs shaped like the sample's, different values (for patched/positive/negative groups)."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for key in sample.in_keys:
        x = sample.example[key]
        if x.is_floating_point():
            values[key] = torch.randn(x.shape, generator=generator)
        else:
            values[key] = torch.randint(0, int(x.max()) + 1, x.shape, generator=generator)
    return values


def with_group(sample: zoo.Sample, **groups) -> TensorDict:
    """The sample's inputs plus `(group, in_key)` entries: with_group(s, patched=1)."""
    td = sample.example.clone()
    for group, seed in groups.items():
        for key, value in other_inputs(sample, seed).items():
            td[(group, key)] = value
    return td


def assert_same_tensordict(expected: TensorDictBase, got: TensorDictBase, rtol=1e-5, atol=1e-6) -> None:
    """The same leaf keys, and every tensor equal within float tolerance."""
    want = {k for k in expected.keys(include_nested=True, leaves_only=True)}
    have = {k for k in got.keys(include_nested=True, leaves_only=True)}
    assert want == have, f"keys differ: only tdhook {want - have}, only tdhook_fx {have - want}"
    assert tuple(expected.batch_size) == tuple(got.batch_size)
    for key in want:
        torch.testing.assert_close(
            got[key], expected[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )


def run_both(tdhook_method, tdhook_fx_method, sample: zoo.Sample, td: TensorDictBase, **prepare):
    """The method run by tdhook and by tdhook_fx on clones of `td`; returns both TensorDicts."""
    keys = dict(in_keys=sample.in_keys, out_keys=sample.out_keys, **prepare)
    with tdhook_method.prepare(sample.model, **keys) as hooked:
        expected = hooked(td.clone())
    with tdhook_fx_method.prepare(sample.model, **keys) as hooked:
        got = hooked(td.clone())
    return expected, got
