"""TransformerLens names for the Hugging Face families in the zoo (GPT-2, GPT-NeoX, Llama, BERT).

`blocks.3.hook_resid_post`, `blocks[*].attn.hook_pattern`, `hook_embed`, `ln_final` ... stand
for this model's own sites (`transformer.h.3`, `transformer.h[*].attn:pattern`, ...). A name
is translated only where no module of the model has it, and values keep the model's shapes
(TransformerLens splits heads in `hook_q`/`hook_z`: (batch, pos, head, d_head); here `hook_q` is
what attention multiplies, (batch, head, pos, d_head), and `hook_z` the heads' output before
the output projection, (batch, pos, head * d_head)).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from tdhook_fx.syntax import ast
from tdhook_fx.syntax.parse import parse_site


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts; `{L}` in a block alias stands for the layer's path."""

    layers: str  # the ModuleList of blocks, from the family's base model
    top: dict[str, str]  # model-level aliases
    block: dict[str, str]  # per-block aliases ("hook_resid_post": "{L}")


_COMMON_BLOCK = {
    "hook_resid_pre": "{L}:in.hidden_states",
    "hook_resid_post": "{L}",
}
FAMILIES = {
    "gpt2": Family(
        "h",
        {"hook_embed": "wte", "hook_pos_embed": "wpe", "ln_final": "ln_f", "unembed": "^lm_head"},
        {
            **_COMMON_BLOCK,
            "hook_resid_mid": "{L}:add_0",
            "hook_attn_out": "{L}.attn:out.0",
            "hook_mlp_out": "{L}.mlp",
            "ln1": "{L}.ln_1",
            "ln2": "{L}.ln_2",
            "mlp.hook_pre": "{L}.mlp.c_fc",
            "mlp.hook_post": "{L}.mlp.act",
        },
    ),
    "gpt_neox": Family(
        "layers",
        {"hook_embed": "embed_in", "ln_final": "final_layer_norm", "unembed": "^lm_head"},
        {
            **_COMMON_BLOCK,
            "hook_attn_out": "{L}.attention:out.0",
            "hook_mlp_out": "{L}.mlp",
            "ln1": "{L}.input_layernorm",
            "ln2": "{L}.post_attention_layernorm",
            "mlp.hook_pre": "{L}.mlp.dense_h_to_4h",
            "mlp.hook_post": "{L}.mlp.act",
        },
    ),
    "llama": Family(
        "layers",
        {"hook_embed": "embed_tokens", "ln_final": "norm", "unembed": "^lm_head"},
        {
            **_COMMON_BLOCK,
            "hook_resid_mid": "{L}:add_0",
            "hook_attn_out": "{L}.self_attn:out.0",
            "hook_mlp_out": "{L}.mlp",
            "ln1": "{L}.input_layernorm",
            "ln2": "{L}.post_attention_layernorm",
            "mlp.hook_post": "{L}.mlp.down_proj:in.0",
        },
    ),
    "bert": Family(
        "encoder.layer",
        {"hook_embed": "embeddings.word_embeddings", "hook_pos_embed": "embeddings.position_embeddings"},
        {
            **_COMMON_BLOCK,
            "hook_resid_mid": "{L}.attention:out.0",
            "hook_attn_out": "{L}.attention.output.dense",
            "hook_mlp_out": "{L}.output.dense",
            "mlp.hook_pre": "{L}.intermediate.dense",
            "mlp.hook_post": "{L}.intermediate",
        },
    ),
}
_ATTENTION = {"gpt2": "attn", "gpt_neox": "attention", "llama": "self_attn", "bert": "attention.self"}
_OUTPUT_PROJECTION = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "llama": "self_attn.o_proj", "bert": "attention.output.dense"}
for _name, _family in FAMILIES.items():
    _attention = f"{{L}}.{_ATTENTION[_name]}"
    _family.block.update(
        {
            "attn.hook_q": f"{_attention}:q",
            "attn.hook_k": f"{_attention}:k",
            "attn.hook_v": f"{_attention}:v",
            "attn.hook_attn_scores": f"{_attention}:scores",
            "attn.hook_pattern": f"{_attention}:pattern",
            "attn.hook_z": f"{{L}}.{_OUTPUT_PROJECTION[_name]}:in.0",
        }
    )
def family_of(model: nn.Module) -> tuple[str, str] | None:
    """(family, the base model's path: "" or "transformer") for a model of the four families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        return None
    family = FAMILIES[model_type]
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if (name == family.layers or name.endswith("." + family.layers)) and isinstance(module, nn.ModuleList):
            return model_type, name.removesuffix(family.layers).rstrip(".")
    return None


def is_tl_style(path: ast.Path) -> bool:
    """Whether a path reads like a TransformerLens name (`blocks.0...`, `hook_*`, `ln_final`, `unembed`)."""
    first = path.segments[0]
    return isinstance(first, ast.Attr) and (
        first.name in ("blocks", "ln_final", "unembed") or first.name.startswith("hook_")
    )


def translate(path: ast.Path, model: nn.Module) -> str | None:
    """The model's own site text for a TransformerLens path, or None where it names none."""
    found = family_of(model)
    if found is None or not is_tl_style(path):
        return None
    name, base = found
    family = FAMILIES[name]
    prefix = f"{base}." if base else ""
    segments = path.segments
    if segments[0].name != "blocks":
        target = family.top.get(_dotted(segments))
        if target is None:
            return None
        return target[1:] if target.startswith("^") else prefix + target
    if len(segments) < 3:
        return None
    target = family.block.get(_dotted(segments[2:]))
    if target is None:
        return None
    layer = str(ast.Path((segments[1],))) if isinstance(segments[1], ast.Index) else f".{str(ast.Path((segments[1],)))}"
    return target.replace("{L}", f"{prefix}{family.layers}{layer}")


# Why a family has no site for a TransformerLens name that another family has.
_LACKING = {
    ("gpt_neox", "hook_resid_mid"): "its blocks add attention and MLP to the residual stream in parallel "
    "(use_parallel_residual): there is no residual between them; read blocks.L.hook_attn_out or hook_mlp_out",
    ("llama", "mlp.hook_pre"): "its MLP is gated (act(gate_proj(x)) * up_proj(x)): read the projections "
    "themselves, e.g. model.layers[L].mlp.gate_proj",
    ("bert", "ln1"): "BERT normalises after each sublayer: read model.encoder.layer[L].attention.output.LayerNorm",
    ("bert", "ln2"): "BERT normalises after each sublayer: read model.encoder.layer[L].output.LayerNorm",
    ("bert", "ln_final"): "an encoder without a final norm: blocks.L.hook_resid_post of the last layer is its output",
    ("bert", "unembed"): "a base encoder has no unembedding",
}


def lacking(path: ast.Path, model: nn.Module) -> tuple[str, str] | None:
    """(message, hint) for a TransformerLens name another family has and this model's lacks."""
    found = family_of(model)
    if found is None or not is_tl_style(path):
        return None
    segments = path.segments
    name = _dotted(segments[2:]) if segments[0].name == "blocks" else _dotted(segments)
    table = "block" if segments[0].name == "blocks" else "top"
    if not name or not any(name in getattr(f, table) for f in FAMILIES.values()):
        return None
    why = _LACKING.get((found[0], name), f"the {found[0]} family has no counterpart of it in this table")
    return f"this {found[0]} model has no site for the TransformerLens name '{path}'", why


def suggestions(path: ast.Path, model: nn.Module) -> list[str]:
    """Close TransformerLens names, each with the site it stands for: "blocks.0.hook_resid_post = transformer.h.0"."""
    found = family_of(model)
    if found is None or not is_tl_style(path):
        return []
    family = FAMILIES[found[0]]
    segments = path.segments
    if segments[0].name == "blocks" and len(segments) >= 3:
        head = f"blocks{'' if isinstance(segments[1], ast.Index) else '.'}{ast.Path((segments[1],))}"
        known = [f"{head}.{name}" for name in family.block]
    else:
        known = list(family.top)
    written = str(path)
    close = difflib.get_close_matches(written, known, n=3, cutoff=0.6)
    return [f"{name} = {translate(parse_site(name).path, model)}" for name in close]


def _dotted(segments) -> str:
    if not all(isinstance(s, ast.Attr) for s in segments):
        return ""
    return ".".join(s.name for s in segments)
