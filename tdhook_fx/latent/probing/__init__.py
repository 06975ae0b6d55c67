"""Probing: probes on model representations, fed by one compiled pass."""

from tdhook_fx.latent.probing.estimators import MeanDifferenceClassifier
from tdhook_fx.latent.probing.managers import (
    BilinearProbe,
    BilinearProbeManager,
    Probe,
    ProbeManager,
    ProbingError,
)
from tdhook_fx.latent.probing.probing import Probing

__all__ = [
    "BilinearProbe",
    "BilinearProbeManager",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "ProbingError",
]
