"""Probing: probes on model representations, fed by one compiled pass."""

from tdhook_fx.latent.probing.probing import Probing
from tdhook_fx.latent.probing.estimators import MeanDifferenceClassifier
from tdhook_fx.latent.probing.managers import (
    BilinearProbe,
    BilinearProbeManager,
    Probe,
    ProbeManager,
    ProbingError,
)

__all__ = [
    "BilinearProbe",
    "BilinearProbeManager",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "ProbingError",
]
