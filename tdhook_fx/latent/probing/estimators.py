"""Estimators for probing: tdhook's MeanDifferenceClassifier and its torch probes (linear,
bilinear, low-rank bilinear); scikit-learn ones work too."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdhook_fx.errors import InvalidArgument, MethodUsageError


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


class TorchEstimator(nn.Module):
    """A probe trained with Adam on mini-batches (tdhook's `TorchEstimator`): regression (mean
    squared error) when `num_classes` is None, classification (cross-entropy) otherwise.

    `fit(*Xs, y=y)` shuffles with torch's global generator, so a seed set before building and
    fitting gives the same probe as tdhook's. It trains even when called under `no_grad` or
    `inference_mode` (as from inside a model's forward), on copies of inference tensors.
    """

    def __init__(self, *, num_classes: int | None = None, epochs: int = 100, lr: float = 1e-3, batch_size: int = 128, device: torch.device | None = None, verbose: bool = False):
        super().__init__()
        self._num_classes = num_classes
        self._epochs = epochs
        self._lr = lr
        self._batch_size = batch_size
        self._device = device
        self._verbose = verbose

    def fit(self, *Xs: torch.Tensor, y: torch.Tensor):
        with torch.inference_mode(False), torch.enable_grad():
            frozen = [name for name, parameter in self.named_parameters() if parameter.is_inference()]
            if frozen:
                raise MethodUsageError(
                    f"TorchEstimator must be constructed outside torch.inference_mode(); got {', '.join(frozen)}\n"
                    "  hint: build the probe before entering inference_mode"
                )
            tensors = [t.clone() if t.is_inference() else t for t in (*Xs, y)]
            batches = DataLoader(TensorDataset(*tensors), batch_size=self._batch_size, shuffle=True)
            optimizer = torch.optim.Adam(self.parameters(), lr=self._lr)
            for epoch in range(self._epochs):
                self.train()
                for *inputs, target in batches:
                    loss = self._loss_fn(self(*inputs), target)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                if self._verbose and (epoch + 1) % 10 == 0:
                    print(f"Epoch {epoch + 1}/{self._epochs}")
        return self

    def predict(self, *Xs: torch.Tensor) -> torch.Tensor:
        """The class (classification) or the value (regression) for each example."""
        self.eval()
        with torch.no_grad():
            found = self(*Xs)
        return found.argmax(dim=-1) if self._num_classes is not None else found

    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._num_classes is None:
            if output.shape != target.shape:
                raise InvalidArgument(f"Output shape {output.shape} does not match target shape {target.shape}")
            return F.mse_loss(output, target)
        if output.shape[:-1] != target.shape or output.shape[-1] != self._num_classes:
            raise InvalidArgument(f"Output shape {output.shape} does not match target shape {target.shape}")
        return F.cross_entropy(output, target)


class LinearEstimator(TorchEstimator):
    """W h + b on one representation h (d_latent features)."""

    def __init__(self, d_latent: int, bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.linear = nn.Linear(d_latent, self._num_classes or 1, bias=bias, device=self._device)

    def forward(self, *Xs: torch.Tensor) -> torch.Tensor:
        if len(Xs) != 1:
            raise InvalidArgument(f"Linear estimator expects 1 input tensor, got {len(Xs)}")
        return self.linear(Xs[0])


class BilinearEstimator(TorchEstimator):
    """h1^T A h2 + b on two representations (one output per class, or one)."""

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.bilinear = nn.Bilinear(d_latent1, d_latent2, self._num_classes or 1, bias=bias, device=self._device)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return self.bilinear(h1, h2)


class LowRankBilinearEstimator(TorchEstimator):
    """(U h1 + c1) * (V h2 + c2) + b: a bilinear form of rank one per output."""

    def __init__(self, d_latent1: int, d_latent2: int, bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        outputs = self._num_classes or 1
        self.linear1 = nn.Linear(d_latent1, outputs, device=self._device)
        self.linear2 = nn.Linear(d_latent2, outputs, device=self._device)
        self.bias = nn.Parameter(torch.zeros(outputs, device=self._device)) if bias else None

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        found = self.linear1(h1) * self.linear2(h2)
        return found if self.bias is None else found + self.bias
