"""Choosing tokens as Hugging Face `generate` does: greedy, or sampling with temperature, top-k, top-p.

`decoding_options(model, prompt_length, **generation_kwargs)` reads the options the way
`model.generate(**generation_kwargs)` would (the model's `generation_config`, then transformers'
defaults, then the keyword arguments) and refuses, naming them, the options that tdhook_fx does
not implement (beam search, repetition penalties, ...), rather than ignoring them. Tokens are
drawn with transformers' own logits warpers, in its order, from torch's global random generator:
with the same seed, the same tokens as `model.generate`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tdhook_fx.errors import GenerationError

SUPPORTED = {
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
    "pad_token_id", "output_logits", "output_scores", "return_dict_in_generate",
}
# Options that change nothing here: the cache tdhook_fx builds, compilation, bookkeeping.
IGNORED = {
    "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size", "_from_model_config",
    "transformers_version",
}
MODEL_INPUTS = {"attention_mask"}


@dataclass
class DecodingOptions:
    """What a generation does with the logits of each step."""

    max_new_tokens: int
    do_sample: bool
    warpers: LogitsProcessorList
    eos_token_ids: torch.Tensor | None  # 1-D; None: no end-of-sequence token
    pad_token_id: int | None
    output_logits: bool
    output_scores: bool
    return_dict_in_generate: bool

    def choose(self, sequences: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of each sequence from its float32 `logits` (and the processed scores)."""
        scores = self.warpers(sequences, logits)
        if self.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        return tokens, scores

    def ended(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of `tokens` end their sequence."""
        if self.eos_token_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.eos_token_ids.to(tokens.device))


def decoding_options(model, prompt_length: int, generation_kwargs: dict) -> tuple[DecodingOptions, dict]:
    """The options `model.generate(..., **generation_kwargs)` would use, and the model inputs among the
    keyword arguments (`attention_mask`); a `GenerationError` names anything not supported."""
    kwargs = dict(generation_kwargs)
    given = kwargs.pop("generation_config", None)
    config = copy.deepcopy(given if given is not None else GenerationConfig())
    own = getattr(model, "generation_config", None)
    defaults = config._get_default_generation_params()
    if own is not None and given is None:
        config.update(**own.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**defaults, defaults_only=True)
    rest = config.update(**kwargs)
    inputs = {k: v for k, v in rest.items() if k in MODEL_INPUTS}
    unknown = sorted(set(rest) - MODEL_INPUTS)
    baseline = GenerationConfig()
    baseline.update(**defaults, defaults_only=True)
    changed = sorted(
        name for name, value in config.to_dict().items()
        if name not in SUPPORTED | IGNORED and not _same(value, getattr(baseline, name, None))
    )
    if unknown or changed:
        raise GenerationError(
            f"tdhook_fx's generate does not support {', '.join(unknown + changed)}\n"
            f"  hint: it supports {', '.join(sorted(SUPPORTED))} and attention_mask (greedy decoding and "
            "sampling with temperature, top-k and top-p); unset the others (model.generation_config holds "
            "the model's own)"
        )
    return _options(config, prompt_length), inputs


def _same(value, default) -> bool:
    """Equal, or both unset (None, False, 0 and empty all mean "off" in a generation config)."""
    return value == default or (not value and not default)


def _options(config: GenerationConfig, prompt_length: int) -> DecodingOptions:
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    else:
        new = config.max_length - prompt_length
    if new < 1:
        raise GenerationError(
            f"nothing to generate: max_new_tokens={new} (max_length={config.max_length}, the prompt has "
            f"{prompt_length} tokens)\n  hint: pass max_new_tokens=N"
        )
    warpers = LogitsProcessorList()
    if config.do_sample:
        try:  # transformers' order (GenerationMixin._get_logits_processor)
            if config.temperature is not None and config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        except ValueError as error:
            raise GenerationError(f"invalid sampling option: {error}") from None
    eos = config.eos_token_id
    eos_ids = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    pad = config.pad_token_id
    if pad is None and eos_ids is not None:
        pad = int(eos_ids[0])  # as transformers does (with a warning there)
    return DecodingOptions(
        new, bool(config.do_sample), warpers, eos_ids, pad,
        bool(config.output_logits), bool(config.output_scores), bool(config.return_dict_in_generate),
    )
