"""Property: for a position-independent program, what cm.generate saves and the logits each new token
was chosen from equal one forward over the generated sequence (`cm(sequences[:, :-1])`).

Hypothesis draws the model (GPT-2 or Llama style), the program (save / set / steer / prune over
the model's real sites, indices on the feature or batch dimensions only), its values, the
prompt and the decoding options.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tdhook_fx
from tests.generation.conftest import compiled

LENGTH = 24  # the examples programs are compiled on: longer than any generated sequence here


@st.composite
def position_independent(draw, sites, batch: int, length: int):
    """(program text, runtime values): statements that treat every position alike."""
    activations = [
        s for s in sites
        if s.is_activation and s.eager and s.dtype.is_floating_point and len(s.shape) == 3 and s.shape[:2] == (batch, length)
    ]
    parameters = [s for s in sites if s.kind == "param" and len(s.shape) == 2]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lines, values, saved = [], {}, []
    for number in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["save", "set", "steer", "steer", "prune"]))
        if kind == "prune":
            site = draw(st.sampled_from(parameters))
            lines.append(f"prune {site.name} {draw(st.integers(10, 60))}%" + draw(st.sampled_from(["", " by random(3)"])))
            continue
        site = draw(st.sampled_from(activations))
        width = site.shape[-1]
        start = draw(st.integers(0, width - 1))
        index, region = draw(st.sampled_from([("", (batch, length, width)), (f"[..., {start}:]", (batch, length, width - start))]))
        if kind == "save":
            lines.append(f"save {site.name}{index} as s{number}")
            saved.append((f"s{number}", site.order, region))
            continue
        if kind != "save" and draw(st.booleans()):
            index, region = "[0]", (length, width)  # one example of the batch
        options = ["2", "zeros", "value * 0.5", f"$v{number}", f"$f{number}(value)"]
        options += ["mean"] if region[0] == batch else []
        options += [f"@{name}" for name, order, shape in saved if order <= site.order and shape == region]
        value = draw(st.sampled_from(options))
        values[f"v{number}"] = torch.randn(region[-1], generator=generator)
        values[f"f{number}"] = torch.tanh
        op = "=" if kind == "set" else draw(st.sampled_from(["+=", "-=", "*="]))
        lines.append(f"{kind} {site.name}{index} {op} {value}")
    text = "\n".join(lines)
    used = {name: v for name, v in values.items() if f"${name}" in text}
    return text, used


@settings(max_examples=max(8, settings.default.max_examples // 2))  # each draws a generation: half the examples
@given(data=st.data())
def test_generation_equals_one_forward_over_the_sequence(lm, data):
    name = data.draw(st.sampled_from(["gpt2", "llama"]), label="model")
    sample = lm(name)
    ids = sample.example["input_ids"]
    prompt = data.draw(st.integers(1, ids.shape[1]), label="prompt length")
    sites = tdhook_fx.sites(sample.model, example=(torch.zeros(2, LENGTH, dtype=ids.dtype),), in_keys=["input_ids"], out_keys=["logits"])
    text, values = data.draw(position_independent(sites, 2, LENGTH), label="program")
    options = data.draw(st.sampled_from([{}, {"do_sample": True, "top_k": 10}]), label="options")
    new = data.draw(st.integers(1, 6), label="new tokens")
    cm = compiled(sample, text, values, LENGTH)
    torch.manual_seed(data.draw(st.integers(0, 99), label="seed"))
    out = cm.generate(ids[:, :prompt], max_new_tokens=new, output_logits=True, pad_token_id=0, **options)
    sequences = out["sequences"]
    one = cm(sequences[:, :-1])
    computed = sequences.shape[1] - 1
    torch.testing.assert_close(out["logits"], one["logits"][:, prompt - 1 : computed], rtol=1e-4, atol=1e-4)
    saved = dict(out["saved"].items()) if "saved" in out.keys() else {}
    assert set(saved) == set(one.get("saved", {}))
    for key, value in saved.items():
        torch.testing.assert_close(value, one["saved"][key], rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}\n{text}")
