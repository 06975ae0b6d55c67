"""Threads: captures are serialized, confined to their thread, and leave torch as they found it.

Before: several threads compiling one model before its first capture got `CaptureError: the
model returns a Proxy` or `pop from empty list`, once a module without its `steer` node, and
`nn.Module.__call__` stayed patched by fx's tracer; a plain forward in another thread during a
capture crashed (fx's patched `__call__` and export's fake parameters reached it).
"""

from __future__ import annotations

import threading
import traceback

import pytest
import torch
from torch import nn

import tdhook_fx
from tdhook_fx import reference
from tdhook_fx import zoo as builtin_zoo
from tests import zoo


def _fresh(name: str):
    return builtin_zoo.mlp(depth=40) if name == "mlp" else zoo.gpt2()  # deep: a capture takes a while


def _site(name: str, i: int) -> str:
    return str(2 * (i % 3)) if name == "mlp" else f"transformer.h[{i % 2}]"


def _in_threads(count: int, work) -> list:
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 - reported by the test, with where it was raised
            error.add_note("".join(traceback.format_exception(error)))
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_compiling_one_model_from_several_threads(name):
    sample = _fresh(name)
    keys = dict(in_keys=sample.in_keys, out_keys=sample.out_keys)
    inputs = tuple(sample.example[k] for k in sample.in_keys)

    def work(i):
        program = f"steer {_site(name, i)} += {i + 1}\nsave {_site(name, i)} as s"
        cm = tdhook_fx.compile(sample.model, program, example=sample.example, **keys)
        return program, cm(*inputs)

    results = _in_threads(8, work)
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, "\n".join(note for f in failures for note in f.__notes__)
    for program, got in results:
        want = reference.run(sample.model, program, inputs, **keys)
        torch.testing.assert_close(got["saved"]["s"], want[("saved", "s")])
        torch.testing.assert_close(got[sample.out_keys[0]], want[sample.out_keys[0]])
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl
    assert nn.Module.__getattr__.__qualname__ == "Module.__getattr__"


@pytest.mark.parametrize(("name", "frontend"), [("mlp", "fx"), ("mlp", "export"), ("gpt2", "export")])
def test_a_plain_forward_in_another_thread_during_a_capture(name, frontend):
    sample = _fresh(name)
    inputs = tuple(sample.example[k] for k in sample.in_keys)
    call = (lambda: sample.model(*inputs)) if name == "mlp" else (lambda: sample.model(input_ids=inputs[0]).logits)
    with torch.no_grad():
        expected = call()
    stop = threading.Event()
    problems: list = []

    def plain():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    if not torch.equal(call(), expected):
                        problems.append("a different output")
            except Exception as error:  # noqa: BLE001 - reported by the test
                problems.append(repr(error))

    thread = threading.Thread(target=plain)
    thread.start()
    try:
        cm = tdhook_fx.compile(
            sample.model, f"steer {_site(name, 0)} *= 3", example=sample.example,
            in_keys=sample.in_keys, out_keys=sample.out_keys, frontend=frontend,
        )
    finally:
        stop.set()
        thread.join()
    assert problems == []
    want = reference.run(sample.model, f"steer {_site(name, 0)} *= 3", inputs, in_keys=sample.in_keys, out_keys=sample.out_keys)
    torch.testing.assert_close(cm(*inputs)[sample.out_keys[0]], want[sample.out_keys[0]])
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl


def test_calls_from_threads_while_the_model_changes_mode():
    """A module called from several threads follows a mode change once (one new rewrite)."""
    sample = builtin_zoo.mlp()
    cm = tdhook_fx.compile(sample.model, "save 0", example=sample.example)
    x = sample.example["input"]
    sample.model.train()
    results = _in_threads(6, lambda i: cm(x)["saved"]["0"])
    assert not [r for r in results if isinstance(r, Exception)], results
    for result in results:
        torch.testing.assert_close(result, sample.model[0](x))
    assert len(cm._variants) == 2
