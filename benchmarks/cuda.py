"""CUDA: checks, then timings of compiled modules against the plain model on one GPU.

    python -m benchmarks.cuda [--quick]

Checks (each against `tdhook_fx.reference`, as tests/compiler/test_cuda.py does): a compile on
a CUDA example; a CPU-compiled module after `model.to("cuda")`, after `cm.to("cuda")`, then
after a bfloat16 cast. Timings: a GPT-2-style model (the GPT-2 small configuration: 12 layers x
768) and a Llama-style one (8 layers x 1024, grouped-query attention), in float32 and bfloat16,
eager and under `torch.compile`; each ratio is one intervened call / one plain forward of the
same model (compiled the same way), paired round by round (benchmarks/common.py), with
`torch.cuda.synchronize()` after every call. Without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

import tdhook_fx
from benchmarks.common import Config, Section, machine, paired_ratios, setup_process
from tdhook_fx import reference, zoo

PROGRAMS = {"save-all": "save {blocks}", "steer": "steer {block} += $v"}


def gpt2_style(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(config).eval().to("cuda", dtype)
    return model, "transformer.h[*]", "transformer.h[5]", 768


def llama_style(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval().to("cuda", dtype)
    return model, "model.layers[*]", "model.layers[3]", 1024


MODELS = {"GPT-2 small config": gpt2_style, "Llama-style 8 x 1024": llama_style}


def checks() -> list[str]:
    """The correctness checks; returns a line per check ("ok ..." or "FAILED ...")."""
    lines = []
    for move in ("model.to", "cm.to", "compiled on cuda"):
        sample = zoo.gpt2()
        program = "steer transformer.h[0] += $v\nsave transformer.h[1] as block"
        v = torch.randn(64)
        keys = dict(in_keys=sample.in_keys, out_keys=sample.out_keys)
        if move == "compiled on cuda":
            sample.model.cuda()
            cm = tdhook_fx.compile(sample.model, program, example=sample.example.to("cuda"), **keys)
        else:
            cm = tdhook_fx.compile(sample.model, program, example=sample.example, **keys)
            (sample.model if move == "model.to" else cm).to("cuda")
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            sample.model.to(dtype)
            ids = sample.example["input_ids"].cuda()
            values = {"v": v.to("cuda", dtype)}
            want = reference.run(sample.model, program, (ids,), values=values, **keys)
            got = cm(ids, **values)
            try:
                torch.testing.assert_close(got["saved"]["block"], want[("saved", "block")], rtol=tol, atol=tol)
                torch.testing.assert_close(got["logits"], want["logits"], rtol=tol, atol=tol)
                lines.append(f"ok      {move}, {dtype}")
            except AssertionError as error:
                lines.append(f"FAILED  {move}, {dtype}: {str(error).splitlines()[0]}")
    return lines


def synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


def timings(config: Config) -> Section:
    section = Section(
        f"CUDA: intervened call / plain forward ({torch.cuda.get_device_name()})",
        ["model", "dtype", "mode", *PROGRAMS],
        notes=["batch 4 x 128 tokens; save-all saves every block's output; steer adds a vector at a middle block"],
    )
    for name, build in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            model, blocks, block, width = build(dtype)
            ids = torch.randint(0, 1000, (4, 128), device="cuda")
            for mode in ("eager", "torch.compile"):
                plain_model = torch.compile(model) if mode == "torch.compile" else model
                plain = synchronized(lambda: plain_model(input_ids=ids))
                candidates = {}
                for operation, template in PROGRAMS.items():
                    cm = tdhook_fx.compile(
                        model, template.format(blocks=blocks, block=block), example=(ids,),
                        in_keys=["input_ids"], out_keys=["logits"],
                    )
                    if operation == "steer":
                        cm.bind(v=torch.randn(width, device="cuda", dtype=dtype))
                    if mode == "torch.compile":
                        cm.compile()
                    candidates[operation] = synchronized(lambda cm=cm: cm(ids))
                measured = paired_ratios(plain, candidates, config)
                section.add(model=name, dtype=str(dtype).removeprefix("torch."), mode=mode,
                            **{op: round(t.ratio, 3) for op, t in measured.items()})
            del model
            torch.cuda.empty_cache()
    return section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to run (tests marked `cuda` skip here too)")
        return 2
    setup_process()
    config = Config(quick=args.quick, rounds=5 if args.quick else 21)
    info = machine()
    print(f"# tdhook_fx on CUDA\n\nMachine: {torch.cuda.get_device_name()}, host {info['cpu']}, torch {torch.__version__}\n")
    lines = checks()
    print("## Checks\n\n" + "\n".join(lines) + "\n")
    print(timings(config).render())
    return 1 if any(line.startswith("FAILED") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
