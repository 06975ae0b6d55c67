"""The property: whatever is done to a model after compiling (dtype casts, `.train()`/`.eval()`
of it or of one submodule, `load_state_dict` with or without `assign`, in-place weight edits, a
replaced submodule), interleaved with compiles and calls, every call of every compiled module
gives what a fresh compile gives on the model as it is then, and what the hook reference gives.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tdhook_fx
from tdhook_fx import reference

PROGRAMS = ("save 1\nsave 3 as out3", "steer 0 += $v\nsave 2", "set 3[:, 0] = 0\nsave 4", "patch 3\nsave 1")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
EDITS = ("double", "float", "train", "eval", "train_norm", "state", "state_assign", "scale", "replace")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].running_mean.uniform_(-1, 1)
    return model.eval()


def _edit(model: nn.Module, edit: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    if edit in ("double", "float", "train", "eval"):
        getattr(model, edit)()
    elif edit == "train_norm":
        model[1].train(not model[1].training)
    elif edit in ("state", "state_assign"):
        state = {k: v + torch.rand(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=edit == "state_assign")
    elif edit == "scale":
        with torch.no_grad():
            model[0].weight.mul_(1 + torch.rand((), generator=generator).item())
    else:
        dtype = next(model.parameters()).dtype
        model[3] = nn.Linear(8, 8).to(dtype).train(model[3].training)


def _call(cm, model, program: str, x: torch.Tensor, source: torch.Tensor, v: torch.Tensor) -> dict:
    dtype = next(model.parameters()).dtype
    kwargs = {}
    if "$v" in program:
        kwargs["v"] = v.to(dtype)
    if "patch" in program:
        kwargs["patched"] = (source.to(dtype),)
    return cm(x.to(dtype), **kwargs)


def _flat(result: dict) -> dict:
    flat = {k: v for k, v in result.items() if k != "saved"}
    flat.update({("saved", k): v for k, v in result.get("saved", {}).items()})
    return flat


def _reference(model, program, x, source, v) -> dict:
    dtype = next(model.parameters()).dtype
    return reference.run(model, program, (x.to(dtype),), values={"v": v.to(dtype)}, sources={"patched": (source.to(dtype),)})


def check_edit_sequences(frontend: str, max_examples: int):
    x, source, v = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8)

    @settings(max_examples=max_examples)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("compile"), st.sampled_from(PROGRAMS)),
                st.tuples(st.just("call"), st.integers(0, 7)),
                st.tuples(st.sampled_from(EDITS), st.integers(0, 2**16)),
            ),
            min_size=1,
            max_size=10,
        )
    )
    def check(steps):
        model = _model()
        compiled = [(PROGRAMS[0], tdhook_fx.compile(model, PROGRAMS[0], example=(x,), frontend=frontend))]
        for kind, argument in [*steps, ("call", 0)]:
            if kind == "compile":
                dtype = next(model.parameters()).dtype
                compiled.append((argument, tdhook_fx.compile(model, argument, example=(x.to(dtype),), frontend=frontend)))
            elif kind == "call":
                program, cm = compiled[argument % len(compiled)]
                state = {k: t.clone() for k, t in model.state_dict().items()}  # training mode updates statistics
                got = _flat(_call(cm, model, program, x, source, v))
                model.load_state_dict(state)
                fresh = tdhook_fx.compile(model, program, example=(x.to(next(model.parameters()).dtype),), frontend=frontend)
                want = _flat(_call(fresh, model, program, x, source, v))
                model.load_state_dict(state)
                oracle = _reference(model, program, x, source, v)
                model.load_state_dict(state)
                assert cm.training == model.training
                tol = TOLERANCE[next(model.parameters()).dtype]
                for key, value in want.items():
                    assert got[key].dtype == value.dtype, (key, steps)
                    torch.testing.assert_close(got[key], value, rtol=tol, atol=tol)
                    torch.testing.assert_close(got[key], oracle[key], rtol=tol, atol=tol)
            else:
                _edit(model, kind, argument)

    check()


def test_edit_sequences_fx():
    check_edit_sequences("fx", min(settings().max_examples, 15))


@pytest.mark.slow
def test_edit_sequences_export():
    check_edit_sequences("export", settings().max_examples)
