"""Steered text generation: time per generated token against Hugging Face `generate` with a raw hook.

    python benchmarks/generation.py            # GPT-2 small's shape (12 x 768, vocab 50257)
    python benchmarks/generation.py --small    # 4 x 256, vocab 128: what Python overhead costs
    python benchmarks/generation.py --quick    # fewer rounds, no torch.compile

A GPT-2-style model with random weights, batch 4, a 16-token prompt, 64 new tokens (greedy, no
end-of-sequence token, so every run makes all 64), a steering vector added to one block's MLP
output at every position. Every candidate's tokens are compared with the baseline's; then each
is timed against the baseline round by round in one process on one thread (benchmarks/common.py),
and the table gives the median time per generated token and the median
paired ratio. A candidate that makes other tokens is timed all the same (it did the same work:
64 tokens each) and marked: with random weights the logits are nearly tied, so a different order
of float operations can pick another token. Candidates:

- HF generate + raw hook (the baseline): `model.generate` with a forward hook that adds the vector;
- HF generate, no hook: the model alone;
- tdhook_fx eager: `cm.generate` (the compiled program, a static KV cache, eager decoding step);
- tdhook_fx + torch.compile: `cm.generate(..., compile=True)` (the decoding step under inductor;
  compiled once before timing, the compile time is reported separately);
- nnsight: `with model.generate(...) as tracer: for step in tracer.iter[0:64]: ...` (a `LanguageModel`
  around the same model, with a word-level tokenizer made here);
- TransformerLens: a `TransformerBridge` around the same model, `generate` under `hooks(...)`.
A peer that is not installed is listed with the reason. Targets: tdhook_fx eager <= 1.05x the
baseline; tdhook_fx + torch.compile below the eager HF generate without hook (ratio < the "no
hook" row).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import Section, log, machine, paired_once, setup_process

BATCH, PROMPT, NEW = 4, 16, 64
SHAPES = {"gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab=50257), "small": dict(n_layer=4, n_embd=256, n_head=4, vocab=128)}


def build(shape: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], vocab_size=shape["vocab"],
        n_positions=1024, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, config.vocab_size, (BATCH, PROMPT))
    vector = torch.randn(config.n_embd) * 4
    return model, ids, vector, f"transformer.h.{shape['n_layer'] // 2}.mlp"


def candidates(model, ids, vector, layer: str, compile_step: bool):
    """The baseline; name -> zero-argument callable returning the token ids; why some are missing;
    one-time costs in seconds."""
    import tdhook_fx

    options = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    module = model.get_submodule(layer)
    handle = None

    def hf_hooked():
        nonlocal handle
        handle = module.register_forward_hook(lambda m, i, o: o + vector)
        try:
            return model.generate(ids, **options)
        finally:
            handle.remove()

    found = {"HF generate, no hook": lambda: model.generate(ids, **options)}
    missing, seconds = {}, {}
    start = time.perf_counter()
    cm = tdhook_fx.compile(model, f"steer {layer} += $v", example=(ids,), in_keys=["input_ids"], out_keys=["logits"])
    cm.bind(v=vector)
    found["tdhook_fx eager"] = lambda: cm.generate(ids, **options)["sequences"]
    found["tdhook_fx eager"]()
    seconds["tdhook_fx: compile + first generate"] = time.perf_counter() - start
    if compile_step:
        start = time.perf_counter()
        found["tdhook_fx + torch.compile"] = lambda: cm.generate(ids, compile=True, **options)["sequences"]
        found["tdhook_fx + torch.compile"]()
        seconds["tdhook_fx: torch.compile of the decoding step"] = time.perf_counter() - start
    else:
        missing["tdhook_fx + torch.compile"] = "--quick: not compiled"
    for name, make in (("nnsight 0.8", _nnsight), ("TransformerLens", _transformer_lens)):
        try:  # a private copy: TransformerLens's bridge rebuilds the model's modules in place
            found[name] = make(copy.deepcopy(model), ids, vector, layer, options)
        except Exception as error:  # noqa: BLE001 - a peer that is missing or fails is reported, not fatal
            missing[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return hf_hooked, found, missing, seconds


def _tokenizer(vocab: int):
    """A word-level tokenizer over the model's ids (no download; the peers that want one get it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t0")


def _nnsight(model, ids, vector, layer: str, options: dict):
    from nnsight import LanguageModel

    wrapped = LanguageModel(model, tokenizer=_tokenizer(model.config.vocab_size))
    envoy = wrapped
    for part in layer.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def call():
        with wrapped.generate(inputs, **options) as tracer:
            for _ in tracer.iter[0:NEW]:  # bounded: code after an unbounded `tracer.all()` loop never runs
                envoy.output = envoy.output + vector
            result = tracer.result.save()
        return result

    return call


def _transformer_lens(model, ids, vector, layer: str, options: dict):
    import transformer_lens

    folder = tempfile.mkdtemp()
    model.config.save_pretrained(folder)  # the bridge reads the architecture from a config file
    bridge = transformer_lens.TransformerBridge.boot_transformers(folder, hf_model=model, load_weights=False)
    block = layer.split(".")[2]
    hook = (f"blocks.{block}.mlp.hook_out", lambda value, hook: value + vector)

    def call():
        with bridge.hooks(fwd_hooks=[hook]):
            return bridge.generate(
                ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False, use_past_kv_cache=True
            )

    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 4 x 256 GPT-2 (vocab 128) instead of GPT-2 small's shape")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no torch.compile")
    parser.add_argument("--rounds", type=int, help="rounds (default 7; quick: 3)")
    args = parser.parse_args(argv)
    setup_process()
    shape_name = "small" if args.small else "gpt2-small"
    model, ids, vector, layer = build(SHAPES[shape_name])
    baseline, found, missing, seconds = candidates(model, ids, vector, layer, compile_step=not args.quick)
    want = baseline().tolist()
    same = {}
    for name, call in found.items():
        tokens = call()
        tokens = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens)
        same[name] = "-" if name == "HF generate, no hook" else ("yes" if tokens.tolist() == want else "no")
    rounds = args.rounds or (3 if args.quick else 7)
    log(f"timing {len(found)} candidates x {rounds} rounds")
    timings = paired_once(baseline, found, rounds)
    section = Section(
        f"generation: {shape_name}, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, steer {layer}",
        ["candidate", "ms / token", "ratio to HF generate + raw hook", "same tokens"],
    )
    for name, timing in timings.items():
        section.add(**{
            "candidate": name, "ms / token": timing.seconds / NEW * 1000,
            "ratio to HF generate + raw hook": timing.ratio, "same tokens": same[name],
        })
    for name, why in missing.items():
        section.add(**{"candidate": name, "ms / token": why})
    section.notes.extend(f"{what}: {value:.1f} s" for what, value in seconds.items())
    section.notes.append("ratio: median over rounds of (candidate time / baseline time), each measured right after the other")
    print(_machine_line(machine()))
    print(section.render())
    return 0


def _machine_line(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['torch_threads']} thread, torch {info['torch']}, transformers {info['transformers']}, "
        f"nnsight {info['nnsight']}, load average {info.get('load_average')}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
