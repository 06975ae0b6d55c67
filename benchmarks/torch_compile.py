"""torch.compile: the compiled module vs the compiled plain model, and hooks under torch.compile.

For each row: graph breaks (`torch._dynamo.explain`), recompiles while runtime values change
(graphs compiled after the first call, counted by a backend that wraps inductor), whether the
result is right after the change, and the steady time of the compiled call (inductor) against
the compiled plain model, paired round by round (benchmarks/common.py).

Value changes: tdhook_fx rows get new `$alpha` / `$pos` tensors and a re-bound vector; the
hook rows change the tensor their hook reads. "hook added after compiling": the model is
compiled and called, then a steering hook is registered: is it applied?
"""

from __future__ import annotations

import torch
import torch._dynamo

from benchmarks.common import Config, Section, log, paired_ratios
from benchmarks.workloads import selected

COLUMNS = ["model", "variant", "graph breaks", "recompiles on value changes", "right after the change", "steady time / compiled plain"]


class CountingInductor:
    """A torch.compile backend that counts the graphs it compiles (then hands them to inductor)."""

    def __init__(self, inductor: bool):
        self.graphs = 0
        self.inductor = inductor

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        if not self.inductor:
            return graph_module.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph_module, example_inputs)


def run(config: Config) -> list[Section]:
    section = Section(
        "torch.compile",
        COLUMNS,
        notes=[
            (
                "graph breaks: torch._dynamo.explain; recompiles: graphs compiled after the first call while the "
                "runtime values change three times (same shapes); steady time: inductor, paired with the compiled "
                "plain model round by round"
            ),
        ],
    )
    if config.quick:
        section.notes.append("quick run: backend 'eager' (no inductor), so no steady times")
    for name, build in selected(config.models).items():
        workload = build()
        log(f"torch.compile: {name}")
        rows, timed = [], {}
        plain_compiled = _compiled(workload.plain(), config)
        if plain_compiled is not None:
            timed["plain"] = plain_compiled
        for variant, builder in _VARIANTS.items():
            log(f"  {variant}")
            torch._dynamo.reset()
            try:
                row, steady = builder(workload, config)
            except Exception as error:  # noqa: BLE001 - reported in the row; the other rows still run
                row, steady = {"graph breaks": f"fails: {type(error).__name__}"}, None
                log(f"    {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            rows.append({"model": name, "variant": variant, **row})
            if steady is not None:
                timed[variant] = steady
        if len(timed) > 1:
            baseline = timed.pop("plain")
            times = paired_ratios(baseline, timed, config)
            for row in rows:
                if row["variant"] in times:
                    row["steady time / compiled plain"] = round(times[row["variant"]].ratio, 3)
        section.rows.extend(rows)
    return [section]


def _compiled(fn, config: Config):
    if config.quick:
        return None
    compiled = torch.compile(fn)
    with torch.no_grad():
        compiled()
    return compiled


def _breaks(fn, *args, **kwargs) -> int:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()
    return explained.graph_break_count


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-3, atol=1e-4)


# ---- tdhook_fx ------------------------------------------------------------------------------------


def _tdhook_fx_steer(workload, config):
    from tdhook_fx import compile as tdx_compile

    program = f"steer {workload.layer} += $alpha * $v"
    compiled = tdx_compile(workload.model, program, example=workload.td, in_keys=workload.in_keys, out_keys=workload.out_keys)
    changes = [
        {"alpha": torch.tensor(alpha), "v": workload.vector * scale}
        for alpha, scale in ((1.0, 1.0), (2.0, 1.0), (2.0, -1.0), (0.5, 3.0))
    ]
    return _tdhook_fx_row(workload, config, compiled, changes)


def _tdhook_fx_patch(workload, config):
    from tdhook_fx import compile as tdx_compile

    program = f"patch {workload.layer}[:, $pos]"
    compiled = tdx_compile(workload.model, program, example=workload.td, in_keys=workload.in_keys, out_keys=workload.out_keys)
    changes = [{"pos": torch.tensor(p)} for p in (0, 1, 2, 3)]
    return _tdhook_fx_row(workload, config, compiled, changes, patched=workload.source)


def _tdhook_fx_save_all(workload, config):
    compiled = workload.compile("save-all")
    return _tdhook_fx_row(workload, config, compiled, [{}] * 2)


def _tdhook_fx_row(workload, config, compiled, changes: list[dict], patched=None):
    from tdhook_fx import reference

    inputs = workload.inputs
    extra = {} if patched is None else {"patched": patched}
    bound = [k for k in changes[0] if k == "v"]
    runtime = lambda change: {k: v for k, v in change.items() if k not in bound}

    def bind(change):
        if bound:
            compiled.bind(v=change["v"])

    bind(changes[0])
    breaks = _breaks(compiled, *inputs, **runtime(changes[0]), **extra)
    backend = CountingInductor(inductor=not config.quick)
    run = torch.compile(compiled, backend=backend)
    right = True
    key = workload.out_keys[0]
    with torch.no_grad():
        for i, change in enumerate(changes):
            bind(change)
            got = run(*inputs, **runtime(change), **extra)[key]
            values = {k: v for k, v in change.items()}
            sources = {"patched": patched} if patched is not None else None
            want = reference.run(
                workload.model, compiled.program, inputs, in_keys=workload.in_keys, out_keys=workload.out_keys,
                values=values, sources=sources,
            )[key]
            right = right and _close(got, want)
            if i == 0:
                first_graphs = backend.graphs
    has_values = bool(changes[0])
    row = {
        "graph breaks": breaks,
        "recompiles on value changes": backend.graphs - first_graphs if has_values else "-",
        "right after the change": ("yes" if right else "NO") if has_values else ("yes" if right else "NO (wrong result)"),
    }
    steady = None if config.quick else (lambda: run(*inputs, **runtime(changes[-1]), **extra))
    return row, steady


def _tdhook_fx_save_grad(workload, config):
    """`save grad` under torch.compile (if this build supports it): breaks and recompiles."""
    from tdhook_fx import compile as tdx_compile

    program = f"save grad {workload.layer}"
    compiled = tdx_compile(workload.model, program, example=workload.td, in_keys=workload.in_keys, out_keys=workload.out_keys)
    inputs = workload.inputs
    key = workload.out_keys[0]

    def step():
        result = compiled_run(*inputs)
        result[key].sum().backward()
        return compiled.read_grads(result)["saved"][compiled.grad_names[0]]

    with torch.enable_grad():
        breaks = _breaks(compiled, *inputs)
        backend = CountingInductor(inductor=False)
        compiled_run = torch.compile(compiled, backend=backend)
        first = step()
        graphs = backend.graphs
        step()
        eager = compiled(*inputs)
        eager[key].sum().backward()
        want = compiled.read_grads(eager)["saved"][compiled.grad_names[0]]
    row = {
        "graph breaks": breaks,
        "recompiles on value changes": backend.graphs - graphs,
        "right after the change": "yes" if _close(first, want) else "NO",
    }
    return row, None


# ---- raw torch hooks ------------------------------------------------------------------------------


def _hook_before_compiling(workload, config):
    local = workload.private_copy()
    state = {"v": local.vector}
    local.model.get_submodule(local.layer).register_forward_hook(lambda m, a, o: o + state["v"])
    forward = local.plain()
    breaks = _breaks(forward)
    backend = CountingInductor(inductor=not config.quick)
    run = torch.compile(forward, backend=backend)
    right = True
    with torch.no_grad():
        for i, scale in enumerate((1.0, 2.0, -1.0, 0.5)):
            state["v"] = local.vector * scale
            got = _logits(local, run())
            want = _logits(local, forward())
            right = right and _close(got, want)
            if i == 0:
                first = backend.graphs
    row = {
        "graph breaks": breaks,
        "recompiles on value changes": backend.graphs - first,
        "right after the change": "yes" if right else "NO",
    }
    return row, None if config.quick else run


def _hook_after_compiling(workload, config):
    local = workload.private_copy()
    forward = local.plain()
    run = torch.compile(forward, backend=CountingInductor(inductor=False))
    with torch.no_grad():
        run()
        vector = local.vector
        handle = local.model.get_submodule(local.layer).register_forward_hook(lambda m, a, o: o + vector)
        got = _logits(local, run())
        want = _logits(local, forward())
        handle.remove()
        plain = _logits(local, forward())
    applied = _close(got, want)
    silently = "NO (silently ignored)" if _close(got, plain) else "NO"
    return {"graph breaks": "-", "recompiles on value changes": "-", "right after the change": "yes" if applied else silently}, None


def _gradient_hook(workload, config):
    local = workload.private_copy()
    grads = {}

    def keep_grad(module, args, output):
        output.register_hook(lambda g: grads.__setitem__("g", g))

    local.model.get_submodule(local.layer).register_forward_hook(keep_grad)
    forward = local.plain()
    with torch.enable_grad():
        breaks = _breaks(lambda: _logits(local, forward()).sum())
    return {"graph breaks": breaks, "recompiles on value changes": "-", "right after the change": "-"}, None


def _logits(workload, output):
    return output.logits if workload.name == "gpt2" else output


_VARIANTS = {
    "tdhook_fx: steer += $alpha * $v": _tdhook_fx_steer,
    "tdhook_fx: patch [:, $pos]": _tdhook_fx_patch,
    "tdhook_fx: save-all": _tdhook_fx_save_all,
    "tdhook_fx: save grad": _tdhook_fx_save_grad,
    "raw hook (steer), registered before compiling": _hook_before_compiling,
    "raw hook (steer), registered after compiling": _hook_after_compiling,
    "raw gradient hook (tensor.register_hook)": _gradient_hook,
}
