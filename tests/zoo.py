"""The test zoo: one tiny model per graph quirk, plus Hugging Face models from small configs.

Each factory returns a `tdhook_fx.zoo.Sample` (model in eval mode, example TensorDict, keys).
"""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx import zoo
from tdhook_fx.zoo import Sample


class TinyAttention(nn.Module):
    """Keyword input, tuple output (values, attention weights)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states, causal: bool = True):
        batch, seq, width = hidden_states.shape
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, seq, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)
        mask = torch.ones(seq, seq, dtype=torch.bool, device=scores.device).triu(1)
        weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, seq, width)
        return self.proj(out), weights


class TinyBlock(nn.Module):
    """A reused module (`act` runs twice per call) and a residual stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TinyAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.act = nn.GELU()

    def forward(self, x):
        attended, _weights = self.attn(hidden_states=self.ln_1(x))
        x = x + attended
        return x + self.act(self.down(self.act(self.up(self.ln_2(x)))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(32, width) * 0.1)
        self.blocks = nn.ModuleList(TinyBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class InPlaceAfterSite(nn.Module):
    """The parent changes a site's value in place after the site (`h.mul_(2)` on lin1's output)."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(6, 6)
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin1(x)
        h.mul_(2.0)
        return self.lin2(h) + h.sum(-1, keepdim=True)


def tiny_transformer(batch: int = 3, seq: int = 6) -> Sample:
    torch.manual_seed(1)
    model = TinyTransformer().eval()
    ids = torch.randint(0, 50, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["logits"])


def cnn(batch: int = 3) -> Sample:
    """Conv, batch norm, in-place ReLU, pooling, flatten."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    model.eval()
    return Sample(model, TensorDict(input=torch.randn(batch, 3, 8, 8), batch_size=[batch]))


def bert(batch: int = 2, seq: int = 7) -> Sample:
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["last_hidden_state"])


def llama(batch: int = 2, seq: int = 7) -> Sample:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["logits"])


def gpt2() -> Sample:
    return zoo.gpt2(n_layer=2, n_embd=32, n_head=2, batch=2, seq=7)


SMALL = {"mlp": zoo.mlp, "cnn": cnn, "tiny_transformer": tiny_transformer}
HUGGING_FACE = {"gpt2": gpt2, "bert": bert, "llama": llama, "gpt_neox": zoo.gpt_neox}
PRETRAINED = {"minilm": zoo.minilm}
ALL = {**SMALL, **HUGGING_FACE, **PRETRAINED}


def source_inputs(sample: Sample) -> tuple[torch.Tensor, ...]:
    """Different inputs of the same shapes, for patching."""
    generator = torch.Generator().manual_seed(99)
    sources = []
    for key in sample.in_keys:
        x = sample.example[key]
        if x.is_floating_point():
            sources.append(torch.randn(x.shape, generator=generator))
        elif key == "attention_mask":
            sources.append(x.clone())
        else:
            sources.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=generator))
    return tuple(sources)
