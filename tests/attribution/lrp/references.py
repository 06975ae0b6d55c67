"""Reference relevances from zennit, LXT and zennit-crp, computed in their own environment.

zennit imports torchvision, whose PyPI wheels do not load with the CPU torch of tdhook_fx's
environment, so these references run elsewhere, once:

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 zennit zennit-crp lxt
    /tmp/refenv/bin/python tests/attribution/lrp/references.py tests/attribution/lrp/references.pt

The file holds, per case, the model's state, the input and the reference relevance at the
input (loaded with `torch.load(weights_only=True)`); tests/attribution/lrp/test_references.py
compares tdhook_fx's LRP with it (and, marked slow, recomputes it where the environment exists).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.attribution.lrp.models import TARGET_CLASS, Add, MatMul, block, cnn, inputs, mlp

EPSILON = 1e-12  # LXT adds its epsilon where zennit moves away from zero: tiny, they agree


def one_hot(output: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full(output.shape[:1], TARGET_CLASS), output.shape[-1]).to(output)


def zennit_cases() -> dict:
    from zennit.attribution import Gradient
    from zennit.composites import LAYER_MAP_BASE, LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.rules import AlphaBeta, Epsilon, Flat, Pass, WSquare, ZPlus
    from zennit.types import BatchNorm, Convolution, Linear

    def layer_map(convolution):
        return [(BatchNorm, Pass()), *LAYER_MAP_BASE, (Convolution, convolution), (torch.nn.Linear, Epsilon())]

    composites = {
        "epsilon_plus": lambda: LayerMapComposite(layer_map(ZPlus())),
        "epsilon_alpha2_beta1": lambda: LayerMapComposite(layer_map(AlphaBeta(alpha=2, beta=1))),
        "epsilon_plus_flat": lambda: SpecialFirstLayerMapComposite(layer_map(ZPlus()), [(Linear, Flat())]),
        "epsilon_plus_w_square": lambda: SpecialFirstLayerMapComposite(layer_map(ZPlus()), [(Linear, WSquare())]),
    }
    found = {}
    for model_name, build in (("mlp", mlp), ("cnn", cnn)):
        for composite_name, composite in composites.items():
            if model_name == "mlp" and composite_name == "epsilon_alpha2_beta1":
                continue  # no convolution: the same as epsilon_plus
            model, x = build(), inputs(model_name)
            with Gradient(model, composite()) as attributor:
                _, relevance = attributor(x.clone(), one_hot)
            found[f"zennit/{model_name}/{composite_name}"] = {"state": model.state_dict(), "input": x, "relevance": relevance.detach()}
    return found


def lxt_block(model, x: torch.Tensor) -> torch.Tensor:
    """The block's forward in LXT's explicit functions (AttnLRP's rules); its relevance at x."""
    from lxt.explicit import functional as lf
    from lxt.explicit.rules import identity

    def linear(layer, h):
        return lf.linear_epsilon(h, layer.weight, layer.bias, EPSILON)

    def norm(layer, h):
        return lf.layer_norm(h, layer.weight, layer.bias, layer.eps)

    x = x.clone().requires_grad_(True)
    batch, tokens, width = x.shape
    q, k, v = linear(model.qkv, norm(model.ln1, x)).chunk(3, dim=-1)
    scores = lf.matmul(model.split(q), model.split(k).transpose(-1, -2), epsilon=EPSILON)
    scores = lf.mul2(scores, torch.tensor(model.scores.scale, dtype=x.dtype))  # a constant: relevance passes
    attention = lf.softmax(scores, -1)
    mixed = lf.matmul(attention, model.split(v), epsilon=EPSILON).transpose(1, 2).reshape(batch, tokens, width)
    h = lf.add2(x, linear(model.proj, mixed), epsilon=EPSILON)
    inner = identity(model.act, linear(model.fc1, norm(model.ln2, h)))
    h = lf.add2(h, linear(model.fc2, inner), epsilon=EPSILON)
    output = linear(model.head, h[:, -1])
    (relevance,) = torch.autograd.grad(output, x, one_hot(output))
    return relevance


def lxt_cases() -> dict:
    assert MatMul and Add  # the block's modules: the tdhook_fx side gives them their rules
    model, x = block().double(), inputs("block").double()
    return {"lxt/block/attnlrp": {"state": model.state_dict(), "input": x, "relevance": lxt_block(model, x).detach()}}


def crp_cases() -> dict:
    from crp.attribution import CondAttribution
    from zennit.composites import LAYER_MAP_BASE, LayerMapComposite
    from zennit.rules import Epsilon, Pass, ZPlus
    from zennit.types import BatchNorm, Convolution

    composite = LayerMapComposite([(BatchNorm, Pass()), *LAYER_MAP_BASE, (Convolution, ZPlus()), (torch.nn.Linear, Epsilon())])
    found = {}
    for channel in (0, 3, 5):
        model, x = cnn(), inputs("cnn")
        attribution = CondAttribution(model)
        result = attribution(
            x.clone().requires_grad_(True), [{"y": [TARGET_CLASS], "4": [channel]}], composite,
            init_rel=lambda activations: torch.ones_like(activations),
        )
        found[f"crp/cnn/channel_{channel}"] = {"state": model.state_dict(), "input": x, "relevance": result.heatmap.detach()}
    return found


def main(path: str) -> None:
    references = {**zennit_cases(), **lxt_cases(), **crp_cases()}
    torch.save(references, path)
    for name, case in references.items():
        print(f"{name}: relevance {tuple(case['relevance'].shape)}, sum {case['relevance'].sum().item():.6g}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("references.pt")))
