"""Probing: probes on model representations, fed by one compiled pass."""

from tdhook_fx.latent.probing.estimators import (
    BilinearEstimator,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    TorchEstimator,
)
from tdhook_fx.latent.probing.managers import (
    BilinearProbe,
    BilinearProbeManager,
    Probe,
    ProbeManager,
    ProbingError,
)
from tdhook_fx.latent.probing.probing import Probing

__all__ = [
    "BilinearEstimator",
    "BilinearProbe",
    "BilinearProbeManager",
    "LinearEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "ProbingError",
    "TorchEstimator",
]
