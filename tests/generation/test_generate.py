"""cm.generate against the oracle (Hugging Face generate with forward hooks): tokens, step logits, saved values."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tdhook_fx.generation import reference
from tests.generation.conftest import BLOCKS, compiled, width

SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9}


def program(block: str) -> str:
    return "\n".join([
        f"steer {block}[1].mlp += $v",
        f"save {block}[0].mlp as whole",
        f"set {block}[0].mlp[:, 9] = zeros",  # a generated position
        f"steer {block}[1].mlp[:, 2:11] *= 0.5",  # prompt and generated positions
        f"save {block}[1].mlp[:, 3:10] as span",
        f"save {block}[1][:, 8] as one",
        f"steer {block}[0]:out[..., 0:4] += value * 2",  # not the sequence dimension: every position
    ])


def compare(sample, text: str, values: dict, mask=None, new: int = 8, **options):
    ids = sample.example["input_ids"]
    cm = compiled(sample, text, values)
    td = TensorDict(input_ids=ids, batch_size=[ids.shape[0]])
    extra = {}
    if mask is not None:
        td["attention_mask"] = mask
        extra["attention_mask"] = mask
    torch.manual_seed(11)
    got = cm.generate(td, max_new_tokens=new, output_logits=True, pad_token_id=0, **options)
    torch.manual_seed(11)
    want = reference.generate(sample.model, text, ids, values=values, max_new_tokens=new, pad_token_id=0, **extra, **options)
    assert got["sequences"].tolist() == want["sequences"].tolist()
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)
    saved = {k for k in want if isinstance(k, tuple) and k[0] == "saved"}
    assert {k for k in got.keys(include_nested=True, leaves_only=True) if isinstance(k, tuple)} == saved
    for key in saved:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    return got


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("options", [{}, SAMPLING], ids=["greedy", "sampling"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
def test_generate_equals_hf_generate_with_hooks(lm, name, options, padded):
    sample = lm(name)
    ids = sample.example["input_ids"]
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
    v = torch.randn(width(sample), generator=torch.Generator().manual_seed(0)) * 2
    compare(sample, program(BLOCKS[name]), {"v": v}, mask, **options)


def test_the_program_changes_the_tokens(lm):
    sample = lm("gpt2")
    ids = sample.example["input_ids"]
    v = torch.randn(width(sample), generator=torch.Generator().manual_seed(0)) * 4
    steered = compiled(sample, "steer transformer.h[1].mlp += $v", {"v": v}).generate(ids, max_new_tokens=8)
    plain = sample.model.generate(ids, max_new_tokens=8, pad_token_id=0)
    assert steered["sequences"].tolist() != plain.tolist()
    assert steered["sequences"][:, :7].tolist() == ids.tolist()


def test_a_runtime_position_picks_a_position_of_the_whole_sequence(lm):
    sample = lm("llama")
    block = BLOCKS["llama"]
    v = torch.randn(width(sample)) * 3
    for position in (2, 10):  # in the prompt, then generated
        values = {"v": v, "pos": torch.tensor(position)}
        compare(sample, f"steer {block}[0].mlp[:, $pos] += $v\nsave {block}[1][:, $pos] as at", values)


def test_end_of_sequence_pads_and_stops_as_hf_generate(lm):
    sample = lm("gpt2")
    ids = sample.example["input_ids"]
    v = torch.randn(width(sample), generator=torch.Generator().manual_seed(3)) * 2
    text = "steer transformer.h[1].mlp += $v\nsave transformer.h[0].mlp as whole"
    torch.manual_seed(11)
    free = compiled(sample, text, {"v": v}).generate(ids, max_new_tokens=8, do_sample=True, eos_token_id=None)["sequences"]
    first, second = free[0, 7:].tolist(), free[1, 7:].tolist()
    # a token that ends the first sequence early and never comes in the second
    eos = next(t for t in first if t not in second and first.index(t) < len(first) - 1)
    end = 7 + first.index(eos)
    got = compare(sample, text, {"v": v}, new=8, eos_token_id=eos, do_sample=True)
    assert got["sequences"].shape == (2, 15)
    assert got["sequences"][0, end + 1 :].tolist() == [0] * (14 - end)  # padding after the end
    assert got["saved", "whole"].shape[1] == 14


def test_saved_values_follow_the_sequence_computed(lm):
    sample = lm("gpt2")
    ids = sample.example["input_ids"]
    cm = compiled(sample, "save transformer.h[0].mlp as h\nsave lm_head as logits")
    out = cm.generate(ids, max_new_tokens=5, output_logits=True)
    assert out["saved", "h"].shape[:2] == (2, 7 + 5 - 1)
    one = cm(out["sequences"][:, :-1])
    torch.testing.assert_close(out["saved", "h"], one["saved"]["h"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits"], one["logits"][:, 6:], rtol=1e-4, atol=1e-5)
