"""The logit lens: the residual stream after every layer read through the model's final norm and
unembedding, in one compiled program (one forward pass).

    lens = tdhook_fx.logit_lens(model, td)           # a Hugging Face causal LM, td["input_ids"]
    lens["logits"]                                   # (layers, batch, positions, vocab)
    lens["site"]                                     # the L site names, one per row
    tdhook_fx.logit_lens(model, td, top_k=5)["tokens"], [..."probs"]   # (layers, batch, positions, 5)

The captured graph already computes the logits from the last layer's output (final norm, then
unembedding, and whatever the model does in between). The lens copies those nodes, with the
model's own weights, onto each layer's value (`compiler/passes/readout.py`): every readout is part
of the rewritten graph, so `lens.module.code` shows them and the lens of the last layer is the
model's logits. Softmax and top-k, when asked, run in the graph too, so that only k entries per
layer and position are kept. A `program` (steer, patch, set ...) applies before the readouts: the
lens of an intervened model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from torch import fx, nn

from tdhook_fx.compiler import variants
from tdhook_fx.compiler.capture import capture, join_keys
from tdhook_fx.compiler.capture.call_plan import example_inputs
from tdhook_fx.compiler.capture.sites import SiteInfo, SiteTable
from tdhook_fx.compiler.compiled import CompiledModule
from tdhook_fx.compiler.passes.readout import copy_readout, readout_region, stacked, top_k_nodes
from tdhook_fx.compiler.passes.rewrite import rewrite
from tdhook_fx.compiler.passes.rewrite_context import RewriteContext
from tdhook_fx.compiler.resolve import match_sites, resolve
from tdhook_fx.errors import InvalidArgument, TdhookFxError
from tdhook_fx.syntax.parse import parse

# (layers, final norm) of the Hugging Face causal LM families, tried in order against the model
FAMILIES = {
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "model.norm"),  # the layout Mistral and Qwen2 share
}
LOGITS = "lens.logits"
PROBS = "lens.probs"
TOKENS = "lens.tokens"


@dataclass(frozen=True)
class LogitLens:
    """A compiled logit lens: `lens(inputs)` runs the model once and reads every layer out.

    `module` is the compiled module (`module.code` shows the readouts); `sites` names the
    residual-stream site of each row; `top_k` is None (full logits) or k.
    """

    module: CompiledModule
    sites: tuple[str, ...]
    top_k: int | None

    def __call__(self, inputs, **values) -> TensorDict:
        """Every row's logits (or top-k tokens and probabilities) on `inputs`.

        `inputs`: a TensorDict holding the in_keys (and, for a program that patches, the source
        inputs at `(source, in_key)`), or the input tensors. `values`: the program's runtime
        values (`$name`), unless bound with `lens.module.bind(...)`.
        """
        cm = self.module
        tensors = example_inputs(inputs, cm.in_keys)
        sources = {}
        for source, key in cm.patch_inputs:
            if not isinstance(inputs, TensorDictBase):
                raise InvalidArgument("the program patches: pass a TensorDict with the source inputs at (source, in_key)")
            sources.setdefault(source, []).append(inputs.get(join_keys(source, key)))
        with torch.no_grad():
            out = cm(*tensors, **values, **{s: tuple(x) for s, x in sources.items()})
        saved = out["saved"]
        first = saved[LOGITS] if self.top_k is None else saved[TOKENS]
        result = TensorDict(batch_size=first.shape[:-1])
        if self.top_k is None:
            result.set("logits", saved[LOGITS])
        else:
            result.set("tokens", saved[TOKENS])
            result.set("probs", saved[PROBS])
        result.set_non_tensor("site", list(self.sites))
        return result


def logit_lens(
    model: nn.Module,
    inputs,
    *,
    layers: str | None = None,
    norm: str | None = None,
    top_k: int | None = None,
    program: str = "",
    in_keys=None,
    out_keys=None,
    logits_key=None,
    frontend: str = "auto",
    **values,
) -> TensorDict:
    """The logit lens of `model` on `inputs`, from one forward pass.

    Returns a TensorDict of batch size [rows, batch, positions]: "logits" (rows, batch,
    positions, vocab) or, with `top_k=k`, "tokens" and "probs" (rows, batch, positions, k; the
    softmax probabilities, highest first); "site" lists the rows' site names (a list of str).
    The rows are the residual stream before the first layer (the embeddings) and after each
    layer, unless `layers` (a DSL site selector) names other sites. See `compile_logit_lens` for
    the other arguments; `values` are the program's runtime values.
    """
    lens = compile_logit_lens(
        model, inputs, layers=layers, norm=norm, top_k=top_k, program=program, in_keys=in_keys,
        out_keys=out_keys, logits_key=logits_key, frontend=frontend,
    )
    return lens(inputs, **values)


def compile_logit_lens(
    model: nn.Module,
    example,
    *,
    layers: str | None = None,
    norm: str | None = None,
    top_k: int | None = None,
    program: str = "",
    in_keys=None,
    out_keys=None,
    logits_key=None,
    frontend: str = "auto",
) -> LogitLens:
    """Compile the logit lens of `model` (captured on `example`) into one rewritten graph.

    - `norm`: the module path of the final norm, where the readout starts (its input is the
      residual stream); the readout ends at the model output `logits_key` (default "logits").
      For GPT-2, GPT-NeoX and Llama-style models (`FAMILIES`) it is found from the module tree.
    - `layers`: a DSL site selector (`transformer.h[*]`, `model.layers.{0,4}`) of the sites to
      read out; default: the first layer's input and every layer's output.
    - `top_k`: keep the k most probable tokens per row and position instead of the logits.
    - `program`: interventions applied before the readouts (no `stop`).
    - `in_keys`/`out_keys` default to ["input_ids"] and ["logits"].
    The model is left unchanged.
    """
    in_keys = list(in_keys or ["input_ids"])
    out_keys = list(out_keys or ["logits"])
    logits_key = logits_key if logits_key is not None else ("logits" if "logits" in out_keys else out_keys[0])
    if logits_key not in out_keys:
        raise InvalidArgument(f"logits_key {logits_key!r} is not one of the out_keys {out_keys}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InvalidArgument(f"top_k must be a whole number of at least 1, not {top_k!r}")
    ast = parse(program, source="program")
    inputs = example_inputs(example, in_keys)
    captured, table = capture(model, inputs, in_keys, out_keys, frontend)
    resolved = resolve(ast, table, program, "program")
    if resolved.stops:
        raise InvalidArgument("a logit lens reads the model's final norm and unembedding: its program cannot stop the model")
    layer_path, norm_path = _family(model, layers, norm)
    rows = _rows(table, layers, layer_path)
    start = _norm_input(table, norm_path, rows)

    def readouts(ctx: RewriteContext) -> dict[str, fx.Node]:
        output = next(n for n in reversed(ctx.graph.nodes) if n.op == "output")
        end = output.args[0][out_keys.index(logits_key)]
        region = readout_region(ctx.current[start.name], end)
        logits, probabilities, tokens = [], [], []
        for site in rows:
            read = copy_readout(ctx, region, ctx.current[start.name], ctx.current[site.name], f"lens_{site.name}")
            if top_k is None:
                logits.append(read)
            else:
                p, t = top_k_nodes(ctx, read, top_k, f"lens_{site.name}")
                probabilities.append(p)
                tokens.append(t)
        if top_k is None:
            return {LOGITS: stacked(ctx, logits, "lens_logits")}
        return {PROBS: stacked(ctx, probabilities, "lens_probs"), TOKENS: stacked(ctx, tokens, "lens_tokens")}

    variant = variants.assemble(model, captured, table, resolved, rewrite(captured, resolved, readouts), inputs)
    module = CompiledModule(variant, model, inputs)
    module.example_inputs = inputs
    return LogitLens(module, tuple(site.name for site in rows), top_k)


def _family(model: nn.Module, layers: str | None, norm: str | None) -> tuple[str | None, str]:
    """The layers' container path (None when `layers` is given) and the final norm's path."""
    modules = dict(model.named_modules())
    for layer_path, norm_path in FAMILIES.values():
        if isinstance(modules.get(layer_path), nn.ModuleList) and norm_path in modules:
            return (None if layers else layer_path), (norm or norm_path)
    if layers is not None and norm is not None:
        return None, norm
    raise TdhookFxError(
        f"logit lens: cannot tell the layers and the final norm of a {type(model).__name__} "
        f"(known layouts: {', '.join(f'{l} + {n}' for l, n in FAMILIES.values())})\n"
        "  hint: name them: logit_lens(model, inputs, layers='decoder.blocks[*]', norm='decoder.final_norm')"
    )


def _rows(table: SiteTable, layers: str | None, layer_path: str | None) -> list[SiteInfo]:
    """The sites read out: those `layers` selects, or the first layer's input and each layer's output."""
    if layers is not None:
        return match_sites(table, layers)
    outputs = match_sites(table, f"{layer_path}[*]")
    blocks = [s for s in outputs if s.kind == "out" and s.item in (None, 0)]
    first = blocks[0]
    embeddings = [s for s in table.activations(first.module, first.call, "in") if s.shape == first.shape]
    return embeddings[:1] + blocks


def _norm_input(table: SiteTable, norm: str, rows: list[SiteInfo]) -> SiteInfo:
    """The final norm's input: where the readout starts (it must have the rows' shape)."""
    if norm not in table.modules:
        raise TdhookFxError(f"logit lens: the model has no module {norm!r} (the final norm)")
    inputs = table.activations(norm, 0, "in")
    if not inputs:
        raise TdhookFxError(f"logit lens: {norm} is never called with a tensor, so it cannot start the readout")
    start = inputs[0]
    wrong = [s for s in rows if s.shape != start.shape or s.dtype != start.dtype]
    if wrong:
        raise TdhookFxError(
            f"logit lens: {wrong[0].name} is {_fmt(wrong[0])} but {start.name}, where the readout starts, is "
            f"{_fmt(start)}: each row must be shaped like the final norm's input"
        )
    return start


def _fmt(site: SiteInfo) -> str:
    return f"{'x'.join(map(str, site.shape))} {str(site.dtype).removeprefix('torch.')}"
