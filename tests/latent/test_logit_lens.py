"""tdhook_fx.logit_lens: one compiled program equals forward hooks + the final norm and unembedding by hand."""

import pytest
import torch
from tensordict import TensorDict

import tdhook_fx
from tdhook_fx.errors import InvalidArgument, ResolutionError, TdhookFxError
from tdhook_fx.latent.logit_lens import compile_logit_lens, logit_lens
from tdhook_fx.zoo import Sample
from tests import zoo


def neox(batch: int = 2, seq: int = 7) -> Sample:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(6)
    config = GPTNeoXConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, 96, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["logits"])


# family: (the sample, the layers, the final norm, the unembedding), as a researcher would write hooks
FAMILIES = {
    "gpt2": (zoo.gpt2, lambda m: m.transformer.h, lambda m: m.transformer.ln_f, lambda m: m.lm_head),
    "neox": (neox, lambda m: m.gpt_neox.layers, lambda m: m.gpt_neox.final_layer_norm, lambda m: m.get_output_embeddings()),
    "llama": (zoo.llama, lambda m: m.model.layers, lambda m: m.model.norm, lambda m: m.lm_head),
}


@pytest.fixture(scope="module")
def built():
    made = {}

    def get(name):
        if name not in made:
            made[name] = FAMILIES[name][0]()
        return made[name]

    return get


def hooked_lens(model, ids, layers, norm, unembed, steer=None):
    """The residual stream before the first layer and after each, from forward hooks, read out by hand.

    `steer`: (layer index, vector) added to that layer's output by its hook.
    """
    residuals, handles = [], []

    def before_first(module, args, kwargs):
        residuals.append(args[0] if args else kwargs["hidden_states"])

    def after(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if steer is not None and steer[0] == index:
                hidden = hidden + steer[1]
                output = (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            residuals.append(hidden)
            return output

        return hook

    handles.append(layers[0].register_forward_pre_hook(before_first, with_kwargs=True))
    handles.extend(layer.register_forward_hook(after(i)) for i, layer in enumerate(layers))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            read = torch.stack([unembed(norm(h)) for h in residuals])
    finally:
        for handle in handles:
            handle.remove()
    return read, logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_lens_equals_hooks_and_the_readout_by_hand(family, built):
    sample = built(family)
    _, layers, norm, unembed = FAMILIES[family]
    model = sample.model
    lens = logit_lens(model, sample.example)
    want, logits = hooked_lens(model, sample.example["input_ids"], layers(model), norm(model), unembed(model))
    count = len(layers(model)) + 1
    assert lens.batch_size == torch.Size([count, *sample.example["input_ids"].shape])
    assert len(lens["site"]) == count and all(isinstance(s, str) for s in lens["site"])
    torch.testing.assert_close(lens["logits"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens["logits"][-1], logits, rtol=0, atol=0)  # the last row is the model's own readout


@pytest.mark.parametrize("family", list(FAMILIES))
def test_top_k_tokens_and_probabilities(family, built):
    sample = built(family)
    _, layers, norm, unembed = FAMILIES[family]
    lens = logit_lens(sample.model, sample.example, top_k=4)
    want, _ = hooked_lens(sample.model, sample.example["input_ids"], layers(sample.model), norm(sample.model), unembed(sample.model))
    probabilities, _ = torch.topk(want.softmax(-1), 4)
    assert set(lens.keys()) == {"tokens", "probs", "site"}
    assert lens["tokens"].dtype == torch.int64 and lens["tokens"].shape == (*lens.batch_size, 4)
    torch.testing.assert_close(lens["probs"], probabilities, rtol=1e-5, atol=1e-6)
    # ties aside, the same tokens: each chosen token's probability is the one the reference gives it
    torch.testing.assert_close(want.softmax(-1).gather(-1, lens["tokens"]), probabilities, rtol=1e-5, atol=1e-6)


def test_one_forward_pass_and_the_readouts_are_in_the_graph(built):
    sample = built("gpt2")
    lens = compile_logit_lens(sample.model, sample.example)
    code = lens.module.code
    for site in ("transformer_h_0_in_hidden_states", "transformer_h_0", "transformer_h_1"):
        assert f"lens_{site} = " in code
    assert "lens_logits = torch.stack(" in code
    # the compiled graph runs, not the model's modules (a hook on one is refused: it would not run)
    assert not [n for n in lens.module.graph.nodes if n.op == "call_module" and n.target.startswith("model.")]
    lens(sample.example)
    # one pass: each block's two norms once, the final norm once for the model and once per readout
    norms = [n for n in lens.module.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert len(norms) == 2 * 2 + 1 + len(lens.sites)


def test_other_batch_and_sequence_sizes_reuse_the_compiled_lens(built):
    sample = built("llama")
    _, layers, norm, unembed = FAMILIES["llama"]
    lens = compile_logit_lens(sample.model, sample.example)
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    got = lens(TensorDict(input_ids=ids, batch_size=[3]))
    want, _ = hooked_lens(sample.model, ids, layers(sample.model), norm(sample.model), unembed(sample.model))
    torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)


def test_the_lens_of_an_intervened_model(built):
    sample = built("gpt2")
    model = sample.model
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3))
    lens = logit_lens(model, sample.example, program="steer transformer.h[0] += $v", v=vector)
    want, _ = hooked_lens(
        model, sample.example["input_ids"], model.transformer.h, model.transformer.ln_f, model.lm_head, steer=(0, vector)
    )
    torch.testing.assert_close(lens["logits"], want, rtol=1e-5, atol=1e-5)
    plain = logit_lens(model, sample.example)
    torch.testing.assert_close(lens["logits"][0], plain["logits"][0])  # before the steer: unchanged
    assert not torch.allclose(lens["logits"][1], plain["logits"][1])


def test_named_layers_and_norm_on_a_model_of_no_known_family(samples):
    sample = samples("tiny_transformer")  # blocks, ln_f, head; captured with torch.fx
    model = sample.model
    lens = logit_lens(model, sample.example, layers="blocks[*]", norm="ln_f")
    residuals = []
    handles = [block.register_forward_hook(lambda m, a, out: residuals.append(out)) for block in model.blocks]
    try:
        with torch.no_grad():
            logits = model(sample.example["input_ids"])
    finally:
        for handle in handles:
            handle.remove()
    assert lens["site"] == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(lens["logits"], torch.stack([model.head(model.ln_f(h)) for h in residuals]))
    torch.testing.assert_close(lens["logits"][-1], logits)


def test_errors_name_the_problem_and_the_fix(samples, built):
    tiny = samples("tiny_transformer")
    with pytest.raises(TdhookFxError, match=r"cannot tell the layers and the final norm of a TinyTransformer[\s\S]*hint: name them"):
        logit_lens(tiny.model, tiny.example)
    with pytest.raises(TdhookFxError, match="has no module 'final'"):
        logit_lens(tiny.model, tiny.example, layers="blocks[*]", norm="final")
    with pytest.raises(TdhookFxError, match=r"blocks.0.up is 3x6x32 float32 but ln_f:in.input"):
        logit_lens(tiny.model, tiny.example, layers="blocks[0].up", norm="ln_f")
    with pytest.raises(ResolutionError, match="unknown module path"):
        logit_lens(tiny.model, tiny.example, layers="nope[*]", norm="ln_f")
    gpt2 = built("gpt2")
    with pytest.raises(InvalidArgument, match="top_k must be a whole number"):
        logit_lens(gpt2.model, gpt2.example, top_k=0)
    with pytest.raises(InvalidArgument, match="cannot stop"):
        logit_lens(gpt2.model, gpt2.example, program="stop transformer.h[0]")
    with pytest.raises(InvalidArgument, match="logits_key 'scores' is not one of the out_keys"):
        logit_lens(gpt2.model, gpt2.example, logits_key="scores")


def test_top_k_larger_than_the_vocabulary_keeps_every_token(samples):
    sample = samples("tiny_transformer")  # a vocabulary of 50
    lens = logit_lens(sample.model, sample.example, layers="blocks[*]", norm="ln_f", top_k=80)
    assert lens["tokens"].shape[-1] == 50
    torch.testing.assert_close(lens["probs"].sum(-1), torch.ones(lens.batch_size))


def test_public_names():
    assert tdhook_fx.logit_lens is logit_lens and tdhook_fx.compile_logit_lens is compile_logit_lens


def test_the_readme_example_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Logit lens") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    names = {}
    exec(code, names)  # noqa: S102 - the README's own example
    assert names["lens"]["logits"].shape == (5, 2, 8, 128)
    assert names["lens"]["site"][:2] == ["transformer.h.0:in.hidden_states", "transformer.h.0"]
    assert names["top"]["tokens"].shape == (5, 2, 8, 3)
    assert not torch.allclose(names["steered"]["logits"][-1], names["lens"]["logits"][-1])


def test_the_lens_exports_to_a_standalone_pt2(built, tmp_path):
    sample = built("gpt2")
    lens = compile_logit_lens(sample.model, sample.example, top_k=3)
    lens.module.export(tmp_path / "lens.pt2")
    out = torch.export.load(tmp_path / "lens.pt2").module()(sample.example["input_ids"])
    want = lens(sample.example)
    assert torch.equal(out["saved"]["lens.tokens"], want["tokens"])
    torch.testing.assert_close(out["saved"]["lens.probs"], want["probs"])


def test_a_lens_is_not_saved_as_a_program_that_would_load_without_its_readouts(built, tmp_path):
    sample = built("gpt2")
    lens = compile_logit_lens(sample.model, sample.example)
    with pytest.raises(tdhook_fx.ExportError, match="export it instead"):
        lens.module.save(tmp_path / "lens.safetensors")
