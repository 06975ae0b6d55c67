"""The decoding step: a causal language model called on a chunk of tokens with a static KV cache.

`step_model(model, cache_length)` is the module that tdhook_fx compiles for generation. It
shares every submodule, parameter and buffer of `model` (so its module paths and site names
are the model's own) and changes only `forward`:

    forward(input_ids, attention_mask, position_ids, cache_start, key_cache_0, value_cache_0, ...)
        -> logits

`input_ids` and `position_ids` (batch, chunk) are the tokens computed in this call, at sequence
positions `cache_start, cache_start + 1, ...`; `attention_mask` (batch, cache_length) marks the
real tokens of the whole sequence (0 for left padding); the cache tensors (batch, heads,
cache_length, head_dim), one key and one value tensor per layer, are written in place at the
chunk's positions. Every shape but the chunk's and the batch's is fixed, so one capture serves
the prompt (a chunk of its length) and every decoding step (a chunk of one), torch.compile sees
no shape change as the sequence grows, and the graph exports to .pt2 as it is. The model itself
is never changed.

`step_model(model, cache_length, last_logits=True)` computes the output head at the chunk's last
position only (transformers' `logits_to_keep=1`, what `model.generate` does for the prompt): the
prefill of a program that does not touch the head needs no more.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs
from transformers.configuration_utils import get_head_shapes

from tdhook_fx.errors import GenerationError

OUT_KEYS = ("logits",)
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "cache_start")
SMALLEST_CACHE = 32


@dataclass(frozen=True)
class CacheShape:
    """The static cache a model needs: per layer one key and one value tensor of this shape."""

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    def keys(self) -> tuple[str, ...]:
        """The step's cache in_keys, in the order its forward takes them."""
        return tuple(f"{kind}_cache_{i}" for i in range(self.layers) for kind in ("key", "value"))

    def allocate(self, batch: int, length: int, device) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.heads, length, self.head_dim)
        return tuple(torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(2 * self.layers))


def cache_length(total: int) -> int:
    """The static cache length for sequences of `total` tokens: a power of two, so that a few
    lengths (each one capture) serve every prompt and generation length."""
    length = SMALLEST_CACHE
    while length < total:
        length *= 2
    return length


def in_keys(shape: CacheShape) -> tuple[str, ...]:
    return INPUT_KEYS + shape.keys()


def cache_shape(model: nn.Module) -> CacheShape:
    """The static cache `model` needs, or a `GenerationError` saying why it cannot generate here."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    parameters = _forward_parameters(model)
    if config is None or "cache" not in parameters or "use_cache" not in parameters:
        raise GenerationError(
            f"{name} is not a Hugging Face causal language model with a KV cache (its forward takes no "
            "`cache` and `use_cache`)\n"
            "  hint: generation needs a transformers model such as GPT2LMHeadModel or LlamaForCausalLM"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise GenerationError(f"{name} is an encoder-decoder model; tdhook_fx generates with decoder-only models")
    text = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(text)
    others = sorted(set(layer_types) - {"full_attention"})
    if others:
        raise GenerationError(
            f"{name} has {', '.join(others)} layers; tdhook_fx's static cache holds full attention layers only"
        )
    heads, head_dim = get_head_shapes(text)
    if isinstance(heads, list) or isinstance(head_dim, list):
        raise GenerationError(f"{name}'s layers differ in their number of heads or head size; its cache is not supported")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return CacheShape(len(layer_types), heads, head_dim, dtype)


def _forward_parameters(model: nn.Module) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


_STEP_CLASSES: dict[type, type] = {}
_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[int, nn.Module]] = weakref.WeakKeyDictionary()


def step_model(model: nn.Module, length: int, last_logits: bool = False) -> nn.Module:
    """The decoding-step module of `model` for a cache of `length` positions (one per model, length
    and head setting, so that the compiler's capture, cached per module, is made once)."""
    per_model = _STEPS.setdefault(model, {})
    step = per_model.get((length, last_logits))
    if step is None:
        step = per_model[(length, last_logits)] = _share(model, _step_class(type(model)))
        step.__dict__["_logits_to_keep"] = 1 if last_logits else 0
    step.training = model.training
    return step


def keeps_last_logits(model: nn.Module) -> bool:
    """Whether `model` can compute its head at the last position only (`logits_to_keep`)."""
    return "logits_to_keep" in _forward_parameters(model)


def head_module(model: nn.Module) -> str | None:
    """The dotted name of `model`'s output head (`lm_head`), if it says which it is."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


def _step_class(model_class: type) -> type:
    cls = _STEP_CLASSES.get(model_class)
    if cls is None:
        namespace = {"forward": _step_forward, "_model_class": model_class, "__module__": __name__}
        cls = _STEP_CLASSES[model_class] = type(f"{model_class.__name__}Step", (model_class,), namespace)
    return cls


def _share(model: nn.Module, cls: type) -> nn.Module:
    """An instance of `cls` made of `model`'s attributes, submodules, parameters and buffers (shared,
    not copied), with hooks of its own: nothing registered on it reaches `model`."""
    step = cls.__new__(cls)
    nn.Module.__init__(step)
    own = set(step.__dict__)
    for name, value in model.__dict__.items():
        if name not in own:
            step.__dict__[name] = value
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        step.__dict__[name] = model.__dict__[name]
    return step


def _step_forward(self, input_ids, attention_mask, position_ids, cache_start, *caches):
    cache = _input_cache(caches, cache_start)
    head = {"logits_to_keep": self._logits_to_keep} if self._logits_to_keep else {}
    output = self._model_class.forward(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        **head,
    )
    return output.logits


def _input_cache(caches: tuple[torch.Tensor, ...], start: torch.Tensor) -> Cache:
    """A transformers `Cache` whose layers write into the given tensors from position `start` on."""
    return Cache(layers=[InputLayer(keys, values, start) for keys, values in zip(caches[0::2], caches[1::2])])


class InputLayer(StaticLayer):
    """A `StaticLayer` over tensors given to the step; transformers' own `update` writes them in place.

    (It sets the attributes that `StaticLayer.lazy_initialization` would, without allocating.)
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values = keys, values
        self.cumulative_length = start.clone()  # `update` advances it in place
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True
