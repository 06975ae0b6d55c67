"""HookSession: tdhook 0.3.0's session semantics, compiled into one program per call.

Every test runs the same session code with tdhook's `HookSession` and with tdhook_fx's on the
same model and inputs, and compares what the model returned and what was captured.
"""

from __future__ import annotations

import pytest
import torch
from tdhook import session as tdhook_session
from tdhook.targets import Target as TdhookTarget
from torch import nn

from tdhook_fx import session as fx_session
from tdhook_fx.errors import BindingError, InvalidArgument, MethodUsageError
from tdhook_fx.methods.programs import PROGRAMS
from tdhook_fx.targets import Target

LIBRARIES = {"tdhook": (tdhook_session, TdhookTarget), "tdhook_fx": (fx_session, Target)}


def run_both(model, script):
    """`script(session_module, Target, model)` under both libraries; returns both results."""
    return [script(lib, target, model) for lib, target in LIBRARIES.values()]


def assert_close(expected, got):
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys()
        for key in expected:
            assert_close(expected[key], got[key])
    else:
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            assert_close(a, b)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.Tanh()).eval()


def test_capture_and_replace_match_tdhook_and_compile_once(mlp):
    x = torch.randn(4, 3)

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            captured = session.capture(T("0", "activation", -1, (1, 3)))
            session.replace(T("2", "activation", -1, (0,)), 7.0)
            outputs = [model(x), model(x * 2)]
        return outputs, captured.values

    expected, got = run_both(mlp, script)
    assert_close(expected, got)
    assert torch.allclose(mlp(x), mlp(x))  # the model is itself again
    before = PROGRAMS.compilations
    script(fx_session, Target, mlp)
    assert PROGRAMS.compilations == before  # same operations and shapes: nothing compiled


def test_the_program_of_a_call_is_shown(mlp):
    with fx_session.HookSession(mlp) as session:
        session.capture(Target("0", "activation", -1, (2,)))
        session.replace(Target("2", "activation", 1, (0, 1)), torch.zeros(1))
        mlp(torch.randn(2, 3))
    assert session.compiled.program.splitlines() == [
        "save model.0[..., 2:3] as capture_0_0",
        "set model.2[:, 0:2, ...] = $replace_1_0",
    ]


def test_live_replacement_with_a_transform_matches_tdhook(mlp):
    x = torch.randn(4, 3)

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            source = session.capture(T("0", "activation", -1, (0,)), detach=False)
            session.replace(T("1", "activation", -1, (4,)), source, transform=lambda v: v * 10)
            return model(x)

    assert_close(*run_both(mlp, script))


def test_gradient_capture_and_replacement_match_tdhook(mlp):
    x = torch.randn(4, 3, requires_grad=True)

    def script(lib, T, model):
        x.grad = None
        model.zero_grad()
        with lib.HookSession(model) as session:
            out_grad = session.capture(T("2", "gradient", -1, (1,)), direction="bwd_pre")
            in_grad = session.capture(T("2", "gradient", -1, (0, 2)), direction="bwd")
            session.replace(T("0", "gradient", -1, (3,)), 0, direction="bwd_pre")
            model(x).sum().backward()
        return out_grad.values, in_grad.values, x.grad.clone(), mlp[0].weight.grad.clone()

    assert_close(*run_both(mlp, script))


def test_a_parameter_replacement_matches_tdhook_without_writing_the_weight(mlp):
    x = torch.randn(4, 3)
    original = mlp[2].weight.detach().clone()

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            captured = session.capture(T("2", "parameter", 0, (1,), parameter="weight"))
            session.replace(T("2", "parameter", 1, (0, 1), parameter="weight"), -3)
            if lib is fx_session:
                assert torch.equal(model[2].weight, original)  # the graph edits its use, not the weight
            return model(x), captured.values

    assert_close(*run_both(mlp, script))
    assert torch.equal(mlp[2].weight, original)


def test_a_stop_matches_tdhook_and_ends_the_block(mlp):
    x = torch.randn(4, 3, requires_grad=True)

    def script(lib, T, model):
        session = lib.HookSession(model)
        with session:
            captured = session.capture(T("0", "activation", -1, (0,)))
            stopped = session.stop("1")
            model(x)
            pytest.fail("the block goes on after a stop")
        stopped.output.sum().backward()
        return stopped.reached, stopped.output, captured.values, session.program.stopped_at

    expected, got = run_both(mlp, script)
    assert expected[0] is got[0] is True and expected[3] == got[3] == "1"
    assert_close(expected[1:3], got[1:3])


def test_occurrences_of_a_reused_module_match_tdhook():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(2, 2)

        def forward(self, x):
            return self.shared(self.shared(x) + 1) * 2

    torch.manual_seed(1)
    model = Reused()
    x = torch.randn(3, 2)

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            captured = session.capture(T("shared", "activation", -1, (1,), occurrences=(1,)))
            session.replace(T("shared", "activation", -1, (0,), occurrences=(0,)), 5)
            output = model(x)
        evidence = [(e.root_pass, e.selected_indices, e.observed_indices) for e in session.occurrence_evidence]
        return output, captured.values, evidence

    expected, got = run_both(model, script)
    assert_close(expected[:2], got[:2])
    assert expected[2] == got[2]


def test_structured_inputs_and_outputs_of_the_model_itself_match_tdhook():
    class Structured(nn.Module):
        def forward(self, x, *, scale):
            return {"pair": (x + 1, x * scale), "note": "kept"}

    model = Structured()
    x, scale = torch.randn(2, 3), torch.randn(2, 3)

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            out = session.capture(T("", "activation", -1, (2,), output_path=("pair", 1)))
            kw = session.capture(T("", "activation", -1, (0,), output_path=(1, "scale")), direction="fwd_pre_kwargs")
            session.replace(T("", "activation", -1, (1,), output_path=("pair", 0)), 0)
            result = model(x, scale=scale)
        assert result["note"] == "kept"
        return result["pair"], out.values, kw.values

    assert_close(*run_both(model, script))


def test_the_forward_is_restored_on_every_exit_path(mlp):
    x = torch.randn(2, 3)
    plain = mlp(x)
    with pytest.raises(RuntimeError, match="boom"):
        with fx_session.HookSession(mlp) as session:
            session.replace(Target("0", "activation", -1, (0,)), 100)
            assert not torch.allclose(mlp(x), plain)
            raise RuntimeError("boom")
    assert "forward" not in mlp.__dict__ and torch.equal(mlp(x), plain)


def test_a_program_that_cannot_compile_fails_the_call_instead_of_running_the_plain_model(mlp):
    with fx_session.HookSession(mlp) as session:
        session.replace(Target("0", "activation", -1, (0,)), torch.ones(7))  # cannot broadcast to (2, 1)
        with pytest.raises(BindingError, match="does not fit"):
            mlp(torch.randn(2, 3))
    assert "forward" not in mlp.__dict__


def test_mistakes_are_refused_as_tdhook_refuses_them(mlp):
    with fx_session.HookSession(mlp) as session:
        with pytest.raises(InvalidArgument, match="activation target"):
            session.capture(Target("0", "activation", -1, (0,)), direction="bwd")
        with pytest.raises(InvalidArgument, match="Invalid submodule path"):
            session.stop("nowhere")
        with pytest.raises(RuntimeError, match="shape"):
            session.replace(Target("0", "parameter", 0, (0,), parameter="weight"), torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="active context"):
        session.capture(Target("0", "activation", -1, (0,)))


def test_a_hugging_face_model_in_a_session_matches_tdhook(gpt2):
    ids = gpt2.example["input_ids"]

    def script(lib, T, model):
        with lib.HookSession(model) as session:
            captured = session.capture(T("transformer.h.0.mlp", "activation", -1, (3,)))
            session.replace(T("transformer.h.1.attn", "activation", -1, (0, 5), output_path=(0,)), 0.5)
            logits = model(ids).logits
        return logits, captured.values

    assert_close(*run_both(gpt2.model, script))


def test_a_result_holding_an_object_is_refused():
    class WithCache(nn.Module):
        def forward(self, x):
            return {"y": x * 2, "cache": object()}

    model = WithCache()
    with fx_session.HookSession(model), pytest.raises(MethodUsageError, match="returns a object"):
        model(torch.ones(2))
