"""A small estimator for probing (tdhook's MeanDifferenceClassifier); scikit-learn ones work too."""

from __future__ import annotations

import numpy as np

from tdhook_fx.errors import InvalidArgument


class MeanDifferenceClassifier:
    """Binary classifier along the difference of the class means (a 'diff-in-means' probe)."""

    def __init__(self, normalize: bool = True):
        self._normalize = normalize
        self._coef = None
        self._intercept = None

    @property
    def coef_(self):
        if self._coef is None:
            raise InvalidArgument("Model not fitted")
        return self._coef

    @property
    def intercept_(self):
        if self._intercept is None:
            raise InvalidArgument("Model not fitted")
        return self._intercept

    def fit(self, X, y):
        X, y = np.asarray(X), np.asarray(y)
        if y.ndim > 1:
            raise InvalidArgument("Multiclass classification not supported")
        y = np.expand_dims(y, 1)
        pos_count, neg_count = y.sum(), (1 - y).sum()
        if pos_count == 0 or neg_count == 0:
            raise InvalidArgument("Both classes must be present in y")
        pos = (X * y).sum(axis=0) / pos_count
        neg = (X * (1 - y)).sum(axis=0) / neg_count
        coef = pos - neg
        intercept = -0.5 * (np.linalg.norm(pos) ** 2 - np.linalg.norm(neg) ** 2)
        if self._normalize:
            norm = np.linalg.norm(coef)
            if norm > 0:
                coef, intercept = coef / norm, intercept / norm
        self._coef = np.reshape(coef, (1, -1))
        self._intercept = np.reshape(intercept, (1,))
        return self

    def decision_function(self, X):
        return (np.asarray(X) * self.coef_).sum(axis=1) + self.intercept_

    def predict(self, X):
        return self.decision_function(X) > 0

    def predict_proba(self, X):
        positive = 1 / (1 + np.exp(-self.decision_function(X)))
        return np.stack([1 - positive, positive], axis=1)
