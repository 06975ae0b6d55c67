"""HookedModule.run(): save/get/set/stop and the input variants equal plain forward hooks.

The reference below is tdhook 0.1.3's run semantics written with plain hooks: each call
registers a hook on the module in order; a save/get keeps the value its hook sees (the last
call's); a set's hook returns the value; a stop's hook raises. Values are cloned when a hook
sees them (tdhook keeps the tensor itself, which an in-place op after it may change).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st
from tensordict import TensorDict

from tdhook_fx.errors import UnknownModulePath
from tdhook_fx.methods.programs import PROGRAMS
from tdhook_fx.modules import CacheProxy, HookedModule, prepare

KINDS = ["save", "get", "set", "save_input", "get_input", "set_input", "stop"]
GRAD_KINDS = ["save_grad", "get_grad", "set_grad", "save_grad_output", "get_grad_output", "set_grad_output"]
READS = {
    "save",
    "get",
    "save_input",
    "get_input",
    "save_grad",
    "get_grad",
    "save_grad_output",
    "get_grad_output",
}


def first_grad_input(module, grad_input, grad_output, key, direction):
    return grad_input[0]


def loss(output: torch.Tensor) -> torch.Tensor:
    return (output * torch.linspace(-1, 1, output.shape[-1])).pow(2).sum()


class _Stop(Exception):
    pass


# A backward hook sees None (grad_input) or never fires where autograd does not track the value
# (nothing before it needs a gradient, or a set replaced it by a constant); tdhook_fx's `save grad`
# returns the gradient of the value there all the same.
UNTRACKED = object()


def module_profiles(sample) -> dict:
    """For each module: its calls' (input, output) shapes, where a hook sees one tensor each."""
    seen: dict = {}
    handles = []
    for name, module in sample.model.named_modules():
        if not name:
            continue

        def hook(module, args, kwargs, output, name=name):
            simple = (
                len(args) == 1
                and not kwargs
                and isinstance(args[0], torch.Tensor)
                and isinstance(output, torch.Tensor)
            )
            seen.setdefault(name, []).append((args[0].shape, args[0].dtype, output.shape) if simple else None)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        sample.model(*(sample.example[k] for k in sample.in_keys))
    for handle in handles:
        handle.remove()
    return {name: calls for name, calls in seen.items() if all(c is not None for c in calls)}


def hook_run(sample, operations) -> tuple[torch.Tensor | None, list]:
    """tdhook 0.1.3's run() done with plain hooks: (output or None after a stop, value per read)."""
    modules = dict(sample.model.named_modules())
    values: dict[int, torch.Tensor] = {}
    handles = []

    def keep(i, value):
        values[i] = UNTRACKED if value is None else value.detach().clone()

    for i, (kind, name, value) in enumerate(operations):
        module = modules[name]
        if kind in ("save", "get"):
            handles.append(module.register_forward_hook(lambda m, a, out, i=i: keep(i, out)))
        elif kind in ("save_input", "get_input"):
            handles.append(module.register_forward_pre_hook(lambda m, a, i=i: keep(i, a[0])))
        elif kind == "set":
            handles.append(module.register_forward_hook(lambda m, a, out, v=value: v.clone()))
        elif kind == "set_input":
            handles.append(module.register_forward_pre_hook(lambda m, a, v=value: (v.clone(),)))
        elif kind in ("save_grad", "get_grad"):
            handles.append(module.register_full_backward_hook(lambda m, gi, go, i=i: keep(i, gi[0])))
        elif kind in ("save_grad_output", "get_grad_output"):
            handles.append(module.register_full_backward_pre_hook(lambda m, go, i=i: keep(i, go[0])))
        elif kind == "set_grad":
            handles.append(module.register_full_backward_hook(lambda m, gi, go, v=value: (v.clone(),)))
        elif kind == "set_grad_output":
            handles.append(module.register_full_backward_pre_hook(lambda m, go, v=value: (v.clone(),)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out: (_ for _ in ()).throw(_Stop())))
    grads = any(kind in GRAD_KINDS for kind, _, _ in operations)
    inputs = [sample.example[k] for k in sample.in_keys]
    inputs = [x.clone().requires_grad_() if grads and x.is_floating_point() else x for x in inputs]
    try:
        with torch.set_grad_enabled(grads):
            output = sample.model(*inputs)
            if grads and output.requires_grad:  # (a set may have cut the output off the graph)
                loss(output).backward()
                sample.model.zero_grad()
            for i, (kind, _, _) in enumerate(operations):
                if kind in GRAD_KINDS and kind in READS:
                    values.setdefault(i, UNTRACKED)  # its hook never fired: autograd did not track the value
    except _Stop:
        output = None
    except RuntimeError as error:
        if "no input requires gradient" not in str(error):
            raise
        reject()  # torch refuses set_grad on a module whose input autograd does not track (so does tdhook)
    finally:
        for handle in handles:
            handle.remove()
    output = None if output is None else output.detach()
    return output, [values.get(i) for i, (kind, _, _) in enumerate(operations) if kind in READS]


def fx_run(hooked, sample, operations) -> tuple[torch.Tensor | None, list]:
    td = sample.example.clone()
    proxies = []
    grads = any(kind in GRAD_KINDS for kind, _, _ in operations)

    def run_callback(module, data):
        module(data)
        if grads and data[sample.out_keys[0]].requires_grad:
            loss(data[sample.out_keys[0]]).backward()
            sample.model.zero_grad()

    with hooked.run(td, run_callback=run_callback) as run:
        for i, (kind, name, value) in enumerate(operations):
            callback = {"callback": first_grad_input} if kind in ("save_grad", "get_grad") else {}
            if kind.startswith("save"):
                proxies.append(getattr(run, kind)(name, cache_key=f"value_{i}", **callback))
            elif kind.startswith("get"):
                proxies.append(getattr(run, kind)(name, **callback))
            elif kind in ("set", "set_grad_output"):
                getattr(run, kind)(name, value)
            elif kind in ("set_input", "set_grad"):
                getattr(run, kind)(name, (value,))
            else:
                run.stop(name)
    output = td.get(sample.out_keys[0], None)
    return None if output is None else output.detach(), [p.resolve() for p in proxies]


@st.composite
def operations_for(draw, profiles, with_grads: bool):
    """1-5 run() calls on modules whose hooks see one tensor; set values shaped to fit.

    With gradients, a stop is not drawn (nothing to differentiate then) and backward hooks go
    only where a full backward hook works (a float input, no in-place module).
    """
    names = sorted(profiles)
    kinds = KINDS + GRAD_KINDS if with_grads else KINDS
    operations = []
    for _ in range(draw(st.integers(1, 5))):
        name = draw(st.sampled_from(names))
        calls = profiles[name]
        kind = draw(st.sampled_from(kinds))
        if kind == "stop" and with_grads:
            kind = "save"
        if kind in GRAD_KINDS and not calls[0][1].is_floating_point:
            kind = "save_grad_output" if kind.startswith("save") else "save"
        value = None
        if kind.startswith("set"):
            uses_input = kind in ("set_input", "set_grad")
            shapes = {c[0] if uses_input else c[2] for c in calls}
            dtype = calls[0][1] if uses_input else torch.float32
            if len(shapes) > 1 or not dtype.is_floating_point:
                kind = "save"  # a fixed value cannot fit every call (or an integer input): read instead
            else:
                seed = draw(st.integers(0, 2**16))
                value = torch.randn(next(iter(shapes)), generator=torch.Generator().manual_seed(seed))
        if kind.startswith("get") and any(op[:2] == (kind, name) for op in operations):
            kind = kind.replace(
                "get", "save"
            )  # two gets of one module share a cache key (the later one wins, in both)
        operations.append((kind, name, value))
    return operations


@pytest.mark.parametrize("name", ["mlp", "cnn", "tiny_transformer"])
def test_run_equals_plain_hooks(name, samples):
    sample = samples(name)
    profiles = module_profiles(sample)
    hooked = HookedModule(sample.model, sample.in_keys, sample.out_keys)
    with_grads = not any(
        getattr(m, "inplace", False) for m in sample.model.modules()
    )  # full backward hooks refuse in-place ops

    @given(operations_for(profiles, with_grads))
    def check(operations):
        want_output, want_values = hook_run(sample, operations)
        got_output, got_values = fx_run(hooked, sample, operations)
        assert (got_output is None) == (want_output is None), hooked.program
        if want_output is not None:
            torch.testing.assert_close(got_output, want_output, rtol=1e-4, atol=1e-5)
        assert len(got_values) == len(want_values)
        for got, want in zip(got_values, want_values):
            if want is UNTRACKED:
                continue
            assert (got is None) == (want is None), hooked.program
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    check()


def test_a_repeated_run_compiles_nothing(mlp):
    hooked = HookedModule(mlp.model)

    def one_run(value):
        td = mlp.example.clone()
        with hooked.run(td) as run:
            proxy = run.save("0")
            run.set("2", value)
        return td, proxy.resolve()

    one_run(torch.zeros(4, 2))
    before = PROGRAMS.compilations
    td, saved = one_run(torch.ones(4, 2))
    assert PROGRAMS.compilations == before  # the same program text and inputs: reused
    torch.testing.assert_close(td["output"], torch.ones(4, 2))  # with the new value (a runtime value)
    torch.testing.assert_close(saved, mlp.model[0](mlp.example["input"]))
    assert hooked.program.splitlines() == ["save 0 as saved_0", "set 2 = $value_0"]


def test_cache_keys_and_caches_follow_tdhook(mlp):
    hooked = HookedModule(mlp.model)
    with hooked.run(mlp.example.clone(), run_name="r", run_sep="/") as run:
        saved = run.save("[0]")
        got = run.get("1")
        named = run.get("2", cache_key="mine")
        saved_input = run.save_input("[2]")
    assert set(run.cache.keys()) == {"r/[0]_output", "1_output", "mine", "r/[2]_input"}
    assert saved.key == "r/[0]_output" and saved_input.key == "r/[2]_input"
    torch.testing.assert_close(got.resolve(), torch.relu(mlp.model[0](mlp.example["input"])))
    torch.testing.assert_close(
        named.resolve(), saved_input.resolve() @ mlp.model[2].weight.T + mlp.model[2].bias
    )
    outer = TensorDict()
    with hooked.run(mlp.example.clone(), cache=outer) as run:
        run.save("0")
        run.get("1")
    assert set(outer.keys()) == {"run.0_output"} and set(run.cache.keys()) == {"1_output"}
    with pytest.raises(ValueError, match="Dead reference"):
        got.resolve()  # the first run object is gone, and its cache with it


def test_a_proxy_feeds_a_set_in_the_same_run_and_in_a_later_one(mlp):
    hooked = HookedModule(mlp.model)
    with hooked.run(mlp.example.clone()) as first_run:
        first = first_run.get("0")
        first_run.set("1", first)  # skips the ReLU, inside the graph: set 1 = @saved_0
    assert hooked.program.splitlines() == ["save 0 as saved_0", "set 1 = @saved_0"]
    td = mlp.example.clone()
    with hooked.run(td) as run:
        run.set("1", first)  # a proxy of an earlier run resolves to its value then
        with pytest.raises(UnknownModulePath):
            run.set("3", first)
    model = mlp.model
    torch.testing.assert_close(td["output"], model[2](model[0](mlp.example["input"])))


def test_set_callback_runs_in_the_graph_with_tdhooks_arguments(mlp):
    seen = []

    def callback(module, args, output, value, direction):
        seen.append((type(module).__name__, len(args), direction))
        return output * value

    td = mlp.example.clone()
    with HookedModule(mlp.model).run(td) as run:
        run.set("0", torch.tensor(3.0), callback=callback)
    model = mlp.model
    torch.testing.assert_close(td["output"], model[2](model[1](3 * model[0](mlp.example["input"]))))
    assert seen == [("Linear", 1, "fwd")]


def test_stop_leaves_no_outputs_and_only_earlier_values(mlp):
    td = mlp.example.clone()
    with HookedModule(mlp.model).run(td) as run:
        before = run.save("0")
        run.stop("1")
        after = run.save("2")
    assert "output" not in td.keys()
    assert before.resolve() is not None and after.resolve() is None


def test_prepend_puts_a_hook_first(mlp):
    with HookedModule(mlp.model).run(mlp.example.clone()) as run:
        run.set("0", torch.zeros(4, 5))
        first = run.save("0", prepend=True)
        last = run.save("0", cache_key="last")
    torch.testing.assert_close(first.resolve(), mlp.model[0](mlp.example["input"]))
    torch.testing.assert_close(last.resolve(), torch.zeros(4, 5))


def test_keyword_in_keys_and_grad_enabled(gpt2):
    hooked = HookedModule(gpt2.model, in_keys={"input_ids": "tokens"}, out_keys=["logits"])
    td = TensorDict(tokens=gpt2.example["input_ids"], batch_size=[4])
    with hooked.run(td, grad_enabled=True) as run:
        mlp = run.save("transformer.h.0.mlp")
    assert td["logits"].requires_grad and mlp.resolve().shape == (4, 6, 32)
    td = TensorDict(tokens=gpt2.example["input_ids"], batch_size=[4])
    with hooked.run(td) as run:
        run.save("transformer.h.0.mlp")
    assert not td["logits"].requires_grad


def test_run_callback_gets_a_module_that_runs_the_program(mlp):
    outputs = []
    with HookedModule(mlp.model).run(
        mlp.example.clone(), run_callback=lambda module, data: outputs.append(module(data.clone()))
    ) as run:
        proxy = run.save("2")
    torch.testing.assert_close(outputs[0]["output"], proxy.resolve())


def test_prepare_context_and_misuse(mlp):
    with prepare(mlp.model) as hooked, hooked.run(mlp.example.clone()) as run:
        proxy = run.save("0")
    assert proxy.resolve() is not None
    with pytest.raises(RuntimeError, match="in context"):
        hooked.run(mlp.example.clone())
    with pytest.raises(RuntimeError, match="Not in context"):
        run.save("0")
    context = prepare(mlp.model)
    with context, pytest.raises(RuntimeError, match="twice"):
        context.__enter__()


def test_unknown_path_names_the_problem_and_suggests(gpt2):
    hooked = HookedModule(gpt2.model, ["input_ids"], ["logits"])
    with pytest.raises(UnknownModulePath) as error, hooked.run(gpt2.example.clone()) as run:
        run.save("transformer.h.2.mlp")
    assert "transformer.h has 2 elements; [2] is out of range" not in str(
        error.value
    )  # a dotted index is an attribute
    assert "has no submodule '2'" in str(error.value) and "did you mean 'transformer.h.1.mlp'" in str(
        error.value
    )
    with pytest.raises(UnknownModulePath, match=r"\[5\] is out of range"):
        with hooked.run(gpt2.example.clone()) as run:
            run.save("transformer.h[5]")


def test_gradient_variants_compile_to_grad_statements(mlp):
    """save_grad (tdhook's grad_input), save_grad_output and set_grad_output, against plain backward hooks."""
    model = mlp.model
    x = mlp.example["input"]
    hooked = HookedModule(model)
    with hooked.run(
        mlp.example.clone(), run_callback=lambda module, data: loss(module(data)["output"]).backward()
    ) as run:
        grad_input = run.save_grad("2", callback=first_grad_input)
        grad_output = run.get_grad_output("1")
        run.set_grad_output("2", 2 * torch.ones(4, 2))
    model.zero_grad()
    assert set(run.cache.keys()) == {"run.2_grad_input", "1_grad_output"}
    assert hooked.program.splitlines() == [
        "save grad 2:in.input as grad_0",
        "save grad 2 as grad_1",
        "save grad 1 as grad_2",
        "set grad 2 = $grad_value_0",
    ]
    seen = {}
    handles = [
        model[2].register_full_backward_hook(lambda m, gi, go: seen.__setitem__("in", gi[0])),
        model[1].register_full_backward_pre_hook(lambda m, go: seen.__setitem__("out", go[0])),
        model[2].register_full_backward_pre_hook(lambda m, go: (2 * torch.ones(4, 2),)),
    ]
    loss(model(x.clone().requires_grad_())).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    torch.testing.assert_close(grad_input.resolve(), seen["in"])
    torch.testing.assert_close(grad_output.resolve(), seen["out"])


def test_gradients_without_a_backward_stay_unset(mlp):
    with HookedModule(mlp.model).run(mlp.example.clone()) as run:
        proxy = run.save_grad_output("0")
    assert proxy.resolve() is None  # as tdhook: no backward, no backward hook


def test_dead_cache_reference():
    proxy = CacheProxy("x", TensorDict())
    with pytest.raises(ValueError, match="Dead reference"):
        proxy.resolve()


TDHOOK_013_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from tensordict import TensorDict
    from tdhook.contexts import HookingContextFactory
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3)
    td = TensorDict(input=x, batch_size=[4])
    with HookingContextFactory().prepare(model) as hooked:
        with hooked.run(td) as run:
            a = run.save("[0]")
            b = run.get("[1]")
            run.set("[1]", torch.ones(4, 5))
            c = run.save("[2]", cache_key="c")
        out = {"keys": sorted(map(str, run.cache.keys())), "output": td["output"].tolist(),
               "a": a.resolve().tolist(), "b": b.resolve().tolist(), "c": c.resolve().tolist(),
               "x": x.tolist()}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="session")
def tdhook_013(tmp_path_factory) -> str:
    """tdhook 0.1.3 (the release with `run()`) installed into its own folder, away from 0.3.0."""
    target = tmp_path_factory.mktemp("tdhook013")
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), "tdhook==0.1.3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert pip.returncode == 0, f"could not install tdhook 0.1.3 from the package index:\n{pip.stderr}"
    return str(target)


@pytest.mark.slow
def test_same_results_as_tdhook_013(tdhook_013):
    """tdhook 0.1.3 in a subprocess: the same cache keys and values."""
    env = dict(os.environ, PYTHONPATH=tdhook_013)
    result = subprocess.run(
        [sys.executable, "-c", TDHOOK_013_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).eval()
    x = torch.tensor(expected["x"])
    td = TensorDict(input=x, batch_size=[4])
    with prepare(model) as hooked, hooked.run(td) as run:
        a = run.save("[0]")
        b = run.get("[1]")
        run.set("[1]", torch.ones(4, 5))
        c = run.save("[2]", cache_key="c")
    assert sorted(map(str, run.cache.keys())) == expected["keys"]
    for name, proxy in (("a", a), ("b", b), ("c", c)):
        torch.testing.assert_close(proxy.resolve(), torch.tensor(expected[name]))
    torch.testing.assert_close(td["output"], torch.tensor(expected["output"]))
