"""One program per zoo model that uses every shippable feature that model allows, and its values."""

import torch

from tests import zoo


def _vector(width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


PROGRAMS = {
    "mlp": ("save 1\nsteer 2 += $alpha * $v\nprune 0.weight 50% by random(3)", lambda: {"alpha": torch.tensor(2.0), "v": _vector(16)}),
    "cnn": ("save 3\nsteer 4 *= $scale\nprune 9.weight 30%", lambda: {"scale": torch.tensor(0.5)}),
    "tiny_transformer": (
        "save blocks[0].act@1 as act\nsteer blocks[1].attn:out.0 += $v\npatch blocks[0].ln_2[:, 0]",
        lambda: {"v": _vector(16)},
    ),
    "gpt2": (
        (
            "save transformer.h[*].mlp\nsteer transformer.h[1].mlp[:, -1] += $alpha * $v\n"
            "prune transformer.h[0].mlp.c_fc.weight 50%"
        ),
        lambda: {"alpha": torch.tensor(3.0), "v": _vector(32)},
    ),
    "bert": (
        (
            "save encoder.layer[0].intermediate\nset encoder.layer[1].output[:, 0] = zeros\n"
            "prune encoder.layer[0].attention.self.query.weight 25%"
        ),
        dict,
    ),
    "llama": ("save model.layers[0].mlp\nsteer model.layers[1].self_attn:out.0 += $v", lambda: {"v": _vector(32)}),
    "minilm": ("save encoder.layer[*].output\nsteer encoder.layer[3].output *= $scale", lambda: {"scale": torch.tensor(1.5)}),
}


def call_inputs(cm, sample):
    """A TensorDict-free call: the example's tensors, plus patch sources when the program patches."""
    inputs = tuple(sample.example[key] for key in sample.in_keys)
    sources = {"patched": zoo.source_inputs(sample)} if cm.patch_inputs else {}
    return inputs, sources
