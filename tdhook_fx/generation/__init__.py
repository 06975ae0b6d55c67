"""Generation: text generation with a compiled program applied at every position (a KV cache).

    cm.generate(td, max_new_tokens=20)          tdhook_fx.compile(...)'s module
    hooked.generate(td, max_new_tokens=20)      a method's hooked module (steering, caching, ...)
    decoding_step(cm, td, max_new_tokens=20)    the compiled decoding step (.code, .export, .compile)

The pipeline, in the order a call runs it:

    step       the decoding-step module: the model's forward on a chunk of tokens, with a static
               KV cache passed in as tensors (one capture serves the prompt and every step)
    positions  the program split into a prefill program and a decoding program, so that a
               position index means a position of the whole sequence
    steps      each program compiled into the step module's graph (cached; `.code`, `.export`)
    sampling   the options of `model.generate` (greedy, temperature, top-k, top-p, eos)
    run        the decoding loop
    calls      `cm.generate`; `methods` holds `hooked.generate` and the `model.generate` redirect
    reference  the oracle: `model.generate` with forward hooks
"""

from tdhook_fx.generation.calls import decoding_step

__all__ = ["decoding_step"]
