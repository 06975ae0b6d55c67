"""Probing with ProbeManager / BilinearProbeManager: tdhook's results and fitted estimators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from tdhook.latent import probing as tdhook_probing
from tensordict import TensorDict
from torch import nn

from tdhook_fx.errors import MissingInputKey, ProbingError
from tdhook_fx.latent import probing


def accuracy(predictions, labels):
    return {"accuracy": float((np.asarray(predictions) == np.asarray(labels)).mean())}


def last_token(data):
    return data.detach()[:, -1].numpy()


class ConcatLogistic:
    """A bilinear-style estimator with scikit-learn's interface: logistic regression on [h1, h2]."""

    def __init__(self, **kwargs):
        self.model = LogisticRegression(**kwargs)

    def fit(self, h1, h2, y):
        self.model.fit(np.concatenate([h1, h2], axis=1), y)
        return self

    def predict(self, h1, h2):
        return self.model.predict(np.concatenate([h1, h2], axis=1))


def batches(sample, n: int = 24):
    """A fit batch and a predict batch with labels that depend on the input."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for step_type in ("fit", "predict"):
        if sample.in_keys == ["input_ids"]:
            ids = torch.randint(0, 128, (n, 6), generator=generator)
            td = TensorDict(input_ids=ids, batch_size=[n])
            labels = (ids[:, -1] < 64).long()
        else:
            x = torch.randn(n, 3, generator=generator)
            td = TensorDict(input=x, batch_size=[n])
            labels = (x[:, 0] > 0).long()
        td["labels"] = labels
        td["step_type"] = step_type
        out.append(td)
    return out


SETTINGS = {
    "mlp": dict(pattern="0|1|2", preprocess=None),
    "gpt2": dict(pattern=r"transformer\.h\.(0|1)\.mlp$", preprocess=last_token),
}


@pytest.mark.parametrize("sample_name", ["mlp", "gpt2"])
def test_probe_manager_matches_tdhook(request, sample_name):
    sample = request.getfixturevalue(sample_name)
    settings = SETTINGS[sample_name]
    managers, outputs = [], []
    for lib in (tdhook_probing, probing):
        manager = lib.ProbeManager(
            LogisticRegression, {"max_iter": 500}, accuracy, data_preprocess_callback=settings["preprocess"]
        )
        method = lib.Probing(
            settings["pattern"], manager.probe_factory, additional_keys=["labels", "step_type"]
        )
        with method.prepare(sample.model, in_keys=sample.in_keys, out_keys=sample.out_keys) as hooked:
            outputs.append([hooked(td.clone()) for td in batches(sample)])
        managers.append(manager)
    expected, got = managers
    assert got.results.to_dict() == expected.results.to_dict()
    assert sorted(got.estimators) == sorted(expected.estimators)
    for key, estimator in expected.estimators.items():
        np.testing.assert_allclose(got.estimators[key].coef_, estimator.coef_, rtol=1e-4, atol=1e-5)
    for want, have in zip(*outputs):
        torch.testing.assert_close(have[sample.out_keys[0]], want[sample.out_keys[0]])
    assert got.fit_metrics.keys() == got.predict_metrics.keys() == set(expected.estimators)


def test_bilinear_probe_manager_matches_tdhook(gpt2):
    pairs = [("transformer.h.0.mlp", "transformer.h.1.mlp"), ("transformer.h.1", "transformer.h.1")]
    managers = []
    for lib in (tdhook_probing, probing):
        manager = lib.BilinearProbeManager(
            pairs, ConcatLogistic, {"max_iter": 500}, accuracy, data_preprocess_callback=last_token
        )
        method = lib.Probing(
            manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"]
        )
        manager.before_all()
        with method.prepare(gpt2.model, in_keys=["input_ids"], out_keys=["logits"]) as hooked:
            for td in batches(gpt2):
                hooked(td)
        manager.after_all()
        managers.append(manager)
    expected, got = managers
    assert got.key_pattern == expected.key_pattern
    assert got.results.to_dict() == expected.results.to_dict()
    assert set(got.results.keys(include_nested=True, leaves_only=True)) >= {
        ("fit", "transformer.h.0.mlp_transformer.h.1.mlp_fwd", "accuracy")
    }


def test_after_all_names_a_pair_that_saw_one_side():
    class PartlyUsed(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    manager = probing.BilinearProbeManager([("used", "unused")], ConcatLogistic, {}, accuracy)
    manager.before_all()
    with probing.Probing(
        manager.key_pattern, manager.probe_factory, additional_keys=["labels", "step_type"]
    ).prepare(PartlyUsed()) as hooked:
        td = TensorDict(input=torch.randn(8, 3), labels=torch.arange(8) % 2, step_type="fit", batch_size=[8])
        hooked(td)
    with pytest.raises(ProbingError, match=r"still waiting on keys: \['unused', 'used'\]"):
        manager.after_all()


def test_probing_without_step_type_says_how_to_pass_it(mlp):
    manager = probing.ProbeManager(LogisticRegression, {}, accuracy)
    fit, _ = batches(mlp)
    with probing.Probing("0", manager.probe_factory, additional_keys=["labels"]).prepare(mlp.model) as hooked:
        with pytest.raises(ProbingError, match="step_type must be 'fit' or 'predict', got None") as error:
            hooked(fit)
    assert "additional_keys=['labels', 'step_type']" in str(error.value)
    del fit["step_type"]
    with probing.Probing("0", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
        mlp.model
    ) as hooked:
        with pytest.raises(MissingInputKey, match="'step_type'"):
            hooked(fit)


def test_results_are_not_overwritten_silently(mlp):
    manager = probing.ProbeManager(LogisticRegression, {}, accuracy)
    fit, _ = batches(mlp)
    with probing.Probing("0", manager.probe_factory, additional_keys=["labels", "step_type"]).prepare(
        mlp.model
    ) as hooked:
        hooked(fit.clone())
        with pytest.raises(ProbingError, match="already exists"):
            hooked(fit.clone())
    manager.reset_results()
    assert manager.fit_metrics == {}


def test_mean_difference_classifier_matches_tdhook():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), rng.integers(0, 2, size=40)
    ours, theirs = probing.MeanDifferenceClassifier().fit(X, y), tdhook_probing.MeanDifferenceClassifier()
    theirs.fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
