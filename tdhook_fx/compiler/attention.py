"""Fused attention as its math: the sites `q`, `k`, `v`, `scores` and `pattern` of an SDPA call.

`scaled_dot_product_attention` never materialises the attention pattern. When a program touches
a layer's scores or pattern, the rewrite replaces that one call by the computation below, the
one Hugging Face's eager attention does (`softmax(q @ k^T * scale + mask) @ v`, dropout on the
pattern in training); every other call stays fused. The site table uses the same functions to
list the sites' shapes.

- `q`, `k`, `v`: what SDPA multiplies, per attention head (batch, heads, seq, head_dim). Under
  grouped-query attention (`enable_gqa=True`) `k` and `v` are the key/value heads repeated to
  one per query head, as eager attention's `repeat_kv` does.
- `scores`: the softmax's input: scaled query-key products with the masks applied (a masked
  position holds the dtype's lowest value, as eager attention's additive mask makes it).
- `pattern`: the softmax's output (before dropout), (batch, heads, query, key).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
ATTENTION_SITES = ("q", "k", "v", "scores", "pattern")
DESCRIPTIONS = {
    "q": "attention queries, per head",
    "k": "attention keys, per head",
    "v": "attention values, per head",
    "scores": "attention scores: scaled and masked, before softmax",
    "pattern": "attention pattern: softmax of the scores",
}
PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """An SDPA call's arguments by name (`query`, `key`, ..., `enable_gqa`), defaults filled in."""
    arguments = dict(_DEFAULTS)
    arguments.update(zip(PARAMETERS, args))
    arguments.update(kwargs)
    return arguments


def repeat_heads(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Key or value heads repeated to one per query head (grouped-query attention), as `repeat_kv` does."""
    return x.repeat_interleave(query.size(-3) // x.size(-3), dim=-3)


def scaled_products(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q @ k^T times the scale (SDPA's default: 1 / sqrt(head_dim))."""
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    return torch.matmul(q, k.transpose(-2, -1)) * scale


def masked(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The scores with SDPA's masks applied: a boolean mask (and the causal one) puts the dtype's
    lowest value where it is False; a float mask is added."""
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        queries, keys = scores.size(-2), scores.size(-1)
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask
    return scores


def softmax(scores: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The pattern: softmax over keys, computed in float32 and returned in the queries' dtype."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


def attention_values(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Every attention site's value for one SDPA call's arguments (the site table reads shapes
    from them; the pattern's dropout is left out, as the `pattern` site comes before it)."""
    q, k, v = query, key, value
    if enable_gqa:
        k, v = repeat_heads(k, q), repeat_heads(v, q)
    scores = masked(scaled_products(q, k, scale), attn_mask, is_causal)
    return {"q": q, "k": k, "v": v, "scores": scores, "pattern": softmax(scores, q)}

