"""Latent-space methods (tdhook.latent), each compiled into a rewrite of the model's graph."""

from tdhook_fx.latent.activation_caching import ActivationCaching
from tdhook_fx.latent.activation_patching import ActivationPatching
from tdhook_fx.latent.probing import (
    BilinearProbe,
    BilinearProbeManager,
    MeanDifferenceClassifier,
    Probe,
    ProbeManager,
    Probing,
)
from tdhook_fx.latent.steering_vectors import ActivationAddition, SteeringVectors

__all__ = [
    "ActivationAddition",
    "ActivationCaching",
    "ActivationPatching",
    "BilinearProbe",
    "BilinearProbeManager",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "SteeringVectors",
]
