"""CUDA: a compile on a GPU example, and CPU-compiled modules moved to the GPU (model.to, cm.to),
in float32 and bfloat16, give the hook reference's results. Marked `cuda`: skipped without a GPU
(benchmarks/cuda.py runs the same checks with timings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx import zoo as builtin_zoo
from tests import zoo

pytestmark = pytest.mark.cuda

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
CASES = {
    "mlp": (builtin_zoo.mlp, "steer 0 += $v\nsave 2 as block", 16),
    "gpt2": (zoo.gpt2, "steer transformer.h[0] += $v\nsave transformer.h[1] as block", 32),
    "llama": (zoo.llama, "steer model.layers[0] += $v\nsave model.layers[1] as block", 32),
}


def _inputs(sample, device, dtype) -> tuple:
    return tuple(
        sample.example[k].to(device, dtype) if sample.example[k].is_floating_point() else sample.example[k].to(device)
        for k in sample.in_keys
    )


def _check(cm, sample, program, v, device, dtype) -> None:
    inputs = _inputs(sample, device, dtype)
    values = {"v": v.to(device, dtype)}
    want = reference.run(sample.model, program, inputs, in_keys=sample.in_keys, out_keys=sample.out_keys, values=values)
    got = cm(*inputs, **values)
    tol = TOLERANCE[dtype]
    assert got["saved"]["block"].device.type == "cuda"
    torch.testing.assert_close(got["saved"]["block"], want[("saved", "block")], rtol=tol, atol=tol)
    torch.testing.assert_close(got[sample.out_keys[0]], want[sample.out_keys[0]], rtol=tol, atol=tol)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_on_a_cuda_example(name, frontend):
    build, program, width = CASES[name]
    sample = build()
    if name != "mlp" and frontend == "fx":
        pytest.skip("Hugging Face models capture with export")
    sample.model.cuda()
    example = sample.example.to("cuda")
    cm = tdhook_fx.compile(sample.model, program, example=example, in_keys=sample.in_keys, out_keys=sample.out_keys, frontend=frontend)
    _check(cm, sample, program, torch.randn(width), "cuda", torch.float32)


@pytest.mark.parametrize("move", ["model.to", "cm.to"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_on_cpu_then_moved_to_cuda(name, move):
    build, program, width = CASES[name]
    sample = build()
    cm = tdhook_fx.compile(sample.model, program, example=sample.example, in_keys=sample.in_keys, out_keys=sample.out_keys)
    v = torch.randn(width)
    _check(cm, sample, program, v, "cpu", torch.float32)
    (sample.model if move == "model.to" else cm).to("cuda")
    _check(cm, sample, program, v, "cuda", torch.float32)
    (sample.model if move == "model.to" else cm).to(torch.bfloat16)
    _check(cm, sample, program, v, "cuda", torch.bfloat16)
    sample.model.to("cpu", torch.float32)
    _check(cm, sample, program, v, "cpu", torch.float32)


def test_bound_values_and_masks_follow_cm_to_cuda():
    sample = builtin_zoo.mlp()
    program = "steer 0 += $v\nprune 2.weight 50%\nsave 2 as block"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example).bind(v=torch.randn(16))
    cm.to("cuda")
    assert cm.bound_values()["v"].is_cuda and all(m.is_cuda for m in cm.graph_tensors().values())
    x = sample.example["input"].cuda()
    want = reference.run(sample.model, program, (x,), values={"v": cm.bound_values()["v"]})
    torch.testing.assert_close(cm(x)["saved"]["block"], want[("saved", "block")])


def test_autocast_on_cuda():
    sample = zoo.gpt2()
    sample.model.cuda()
    program = "steer transformer.h[0] *= 2\nsave transformer.h[0] as block"
    cm = tdhook_fx.compile(sample.model, program, example=sample.example.to("cuda"), in_keys=sample.in_keys, out_keys=sample.out_keys)
    ids = sample.example["input_ids"].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = reference.run(sample.model, program, (ids,), in_keys=sample.in_keys, out_keys=sample.out_keys)
        got = cm(ids)
    torch.testing.assert_close(got["saved"]["block"], want[("saved", "block")], rtol=3e-2, atol=3e-2)


def test_the_module_is_free_of_cpu_state_after_a_move():
    """Nothing of the CPU capture runs on the GPU: the new rewrite reads only CUDA tensors."""
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example, frontend="export")
    sample.model.cuda()
    cm(sample.example["input"].cuda())
    tensors = [*cm.graph_module.parameters(), *cm.graph_module.buffers()]
    assert tensors and all(t.is_cuda for t in tensors)
    assert isinstance(cm.base_model, nn.Module)
