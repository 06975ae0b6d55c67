"""Generation in the method layer: `hooked.generate(...)` and `model.generate(...)` inside a context.

`hooked.generate(inputs, max_new_tokens=..., **generation_kwargs)` builds the active method's
statements (`OnePassMethod.build`) against the decoding step's sites, generates with them applied
at every position computed, and hands the saved values, joined over the sequence, to the method's
finishing step: `SteeringVectors` steers every token, `ActivationCaching` caches the activations
of the whole sequence, `Pruning` and `Adapters` apply to every step. Methods that run the model in
several passes (attribution, `ActivationPatching`, `ActivationAddition`) have no generation: they
raise a `GenerationError` saying so.

Inside a method's context `model.generate(...)` is `hooked.generate(...)` behind Hugging Face's
return types (the token ids, or a `GenerateDecoderOnlyOutput` with `return_dict_in_generate=True`),
so tdhook code written as `with SteeringVectors(...).prepare(model): model.generate(...)` generates
steered text, as it does with tdhook; what `hooked.generate` cannot do is an error that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tensordict import TensorDict, TensorDictBase

from tdhook_fx.compiler.compiled import CompiledModule
from tdhook_fx.errors import GenerationError
from tdhook_fx.generation.calls import prompt, result
from tdhook_fx.generation.run import Generation
from tdhook_fx.generation.sampling import decoding_options
from tdhook_fx.methods.programs import ProgramBuilder, ProgramResult

if TYPE_CHECKING:
    from tdhook_fx.methods.hooked import HookedModule


def generate_hooked(hooked: HookedModule, inputs, max_new_tokens: int | None = None, *, compile=False, **generation_kwargs) -> TensorDictBase:
    """`hooked.generate`: generate with the active method applied (see the module doc)."""
    hooked._check_context()
    method = hooked._active_method
    name = type(method).__name__ if method is not None else "HookedModule"
    if method is not None and not method.single_pass:
        raise GenerationError(
            f"{name} runs the model in several passes, which has no meaning for generation; hooked.generate "
            "applies methods whose work is one pass of the model (SteeringVectors, ActivationCaching, Pruning, "
            "Adapters)\n"
            "  hint: patching during generation is not supported: see the README's Generation section"
        )
    interface = hooked.interface
    td = inputs if isinstance(inputs, TensorDictBase) else TensorDict(input_ids=inputs, batch_size=inputs.shape[:1])
    ids, mask = prompt(td, list(interface.in_keys))
    if max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = max_new_tokens
    options, model_inputs = decoding_options(interface.model, ids.shape[1], generation_kwargs)
    generation = Generation(interface.model, ids, model_inputs.get("attention_mask", mask), options.max_new_tokens)
    builder = ProgramBuilder()
    finish = method.build(hooked, builder, generation.sites, td) if method is not None else None
    generated = generation.run(
        CompiledModule, builder.program, builder.values, options, source=f"{name} program", compiled=compile
    )
    hooked.__dict__["_compiled"] = generated.decode or generated.prefill
    out = result(generated, with_saved=False)
    if finish is not None:
        finish(ProgramResult(None, generated.saved, hooked.compiled), out)
    return hooked.finalize_tensordict(out)


def model_generate(hooked: HookedModule, args: tuple, kwargs: dict):
    """`model.generate(*args, **kwargs)` inside a method's context: `hooked.generate` with Hugging Face's
    arguments and return types."""
    kwargs = dict(kwargs)
    ids = args[0] if args else kwargs.pop("inputs", kwargs.pop("input_ids", None))
    if len(args) > 1 or not isinstance(ids, torch.Tensor):
        raise GenerationError(
            "model.generate inside a tdhook_fx method's context runs hooked.generate, which takes the token ids "
            "as its first argument and generation options as keywords\n"
            "  hint: call hooked.generate(td_or_ids, max_new_tokens=...) on the module the context gives"
        )
    mask = kwargs.pop("attention_mask", None)
    inputs = TensorDict(input_ids=ids, batch_size=ids.shape[:1])
    if mask is not None:
        inputs["attention_mask"] = mask
    try:
        out = generate_hooked(hooked, inputs, **kwargs)
    except GenerationError as error:
        raise GenerationError(
            f"{error}\n  note: model.generate inside a tdhook_fx method's context runs hooked.generate, so that "
            "the method applies; call hooked.generate(...) directly, or model.generate outside the context"
        ) from None
    if not kwargs.get("return_dict_in_generate", False):
        return out["sequences"]
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    def steps(key):
        return tuple(out[key].unbind(1)) if key in out.keys() else None

    return GenerateDecoderOnlyOutput(sequences=out["sequences"], scores=steps("scores"), logits=steps("logits"))
