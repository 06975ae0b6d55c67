"""The generate calls: `cm.generate(...)` (a compiled program) and what every caller shares.

`inputs` is a TensorDict holding the model's in_keys (the token ids, and an `attention_mask`
where there is one) or the token ids tensor; the result is a TensorDict of batch [B] with
`"sequences"` (B, T + new) and `("saved", name)` for each saved value (every position computed,
joined along the sequence dimension), and, when asked for with `output_logits=True` /
`output_scores=True`, `"logits"` / `"scores"` (B, new, vocab): the logits each new token was
chosen from, before and after temperature/top-k/top-p, as `model.generate` returns them.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.capture import key_name
from tdhook_fx.compiler.values import runtime_entry
from tdhook_fx.errors import GenerationError
from tdhook_fx.generation.run import Generated, Generation
from tdhook_fx.generation.sampling import DecodingOptions, decoding_options

SEQUENCES = "sequences"
SAVED = "saved"


def generate_compiled(cm, inputs, max_new_tokens: int | None = None, *, compile=False, **generation_kwargs) -> TensorDict:
    """`cm.generate`: generate with `cm`'s program applied at every position computed."""
    generation, options, values = _prepare(cm, inputs, max_new_tokens, generation_kwargs)
    generated = generation.run(
        type(cm), cm.resolved.program, values, options, text=cm.resolved.text, compiled=compile
    )
    return result(generated)


def decoding_step(cm, inputs, max_new_tokens: int | None = None, **generation_kwargs):
    """The compiled decoding step that `cm.generate(inputs, max_new_tokens, ...)` runs, without generating.

    A `CompiledModule` like any other: `.code` and `.program` show the rewritten step,
    `.export(path)` writes it as a .pt2 (its example inputs are this generation's first step),
    `.compile()` puts it under torch.compile. Its inputs are the step module's (see
    `tdhook_fx.generation.step`). The program's runtime values are bound on it, and so are the
    gates `$gen_gate_N` of positional statements, at 0 (`step.bind(gen_gate_0=1.0)` at the step
    that computes the statement's position).
    """
    generation, _, values = _prepare(cm, inputs, max_new_tokens, generation_kwargs)
    plan, prefill, decode = generation.steps(type(cm), cm.resolved.program, values, text=cm.resolved.text, reuse=False)
    step = decode if decode is not None else prefill
    gates = {name: 0.0 for name in plan.gates}
    step.bind(**{n: v for n, v in {**values, **gates}.items() if n in step.runtime_names})
    return step


def _prepare(cm, inputs, max_new_tokens, generation_kwargs) -> tuple[Generation, DecodingOptions, dict]:
    model = cm.base_model
    ids, mask = prompt(inputs, cm.in_keys)
    options, model_inputs = decoding_options(model, ids.shape[1], _with_max_new(generation_kwargs, max_new_tokens))
    values = dict(cm.bound_values())
    if isinstance(inputs, TensorDictBase):
        entries = {n: runtime_entry(inputs, n) for n in cm.runtime_names}
        values.update({n: v for n, v in entries.items() if v is not None})
    return Generation(model, ids, model_inputs.get("attention_mask", mask), options.max_new_tokens), options, values


def _with_max_new(kwargs: dict, max_new_tokens: int | None) -> dict:
    return kwargs if max_new_tokens is None else {**kwargs, "max_new_tokens": max_new_tokens}


def prompt(inputs, in_keys) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids and attention mask in `inputs` (a TensorDict holding `in_keys`, or the ids)."""
    if isinstance(inputs, torch.Tensor):
        return inputs, None
    if not isinstance(inputs, TensorDictBase):
        raise GenerationError(f"generate takes a TensorDict or a tensor of token ids, not a {type(inputs).__name__}")
    names = [key_name(k) for k in in_keys]
    ids_key = in_keys[names.index("input_ids")] if "input_ids" in names else in_keys[0]
    others = [n for k, n in zip(in_keys, names) if k != ids_key and n != "attention_mask"]
    if others:
        raise GenerationError(
            f"generation feeds the model token ids and an attention mask only; this model also reads {others}"
        )
    ids = inputs.get(ids_key, None)
    if ids is None:
        raise GenerationError(f"the input TensorDict has no token ids at {ids_key!r}")
    mask = inputs.get("attention_mask", None)
    return ids, mask


def result(generated: Generated, with_saved: bool = True) -> TensorDict:
    """The TensorDict a generate call returns (see the module doc); a method's saved values are its
    own business (`with_saved=False`)."""
    batch = generated.sequences.shape[0]
    td = TensorDict({SEQUENCES: generated.sequences}, batch_size=[batch], device=generated.sequences.device)
    for name, value in generated.saved.items() if with_saved else ():
        if value.dim() == 0 or value.shape[0] != batch:
            raise GenerationError(
                f"the saved value '{name}' has shape {tuple(value.shape)}, which has no batch dimension of size "
                f"{batch}, so it cannot be stored in the result (batch size [{batch}])\n"
                "  hint: keep the batch dimension in the saved site's index"
            )
        td.set((SAVED, name), value)
    if generated.logits:
        td.set("logits", torch.stack(generated.logits, dim=1))
    if generated.scores:
        td.set("scores", torch.stack(generated.scores, dim=1))
    return td
