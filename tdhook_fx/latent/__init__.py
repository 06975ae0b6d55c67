"""Latent-space methods (tdhook.latent), each compiled into a rewrite of the model's graph."""

from tdhook_fx.latent.activation_caching import ActivationCaching
from tdhook_fx.latent.activation_patching import ActivationPatching
from tdhook_fx.latent.dimension_estimation import (
    CaPcaDimensionEstimator,
    LocalKnnDimensionEstimator,
    LocalPcaDimensionEstimator,
    TwoNnDimensionEstimator,
)
from tdhook_fx.latent.probing import (
    BilinearEstimator,
    BilinearProbe,
    BilinearProbeManager,
    LinearEstimator,
    LowRankBilinearEstimator,
    MeanDifferenceClassifier,
    Probe,
    ProbeManager,
    Probing,
)
from tdhook_fx.latent.representation_similarity import CkaEstimator, InformationImbalanceEstimator
from tdhook_fx.latent.steering_vectors import ActivationAddition, SteeringVectors

__all__ = [
    "ActivationAddition",
    "ActivationCaching",
    "ActivationPatching",
    "BilinearEstimator",
    "BilinearProbe",
    "BilinearProbeManager",
    "CaPcaDimensionEstimator",
    "CkaEstimator",
    "InformationImbalanceEstimator",
    "LinearEstimator",
    "LocalKnnDimensionEstimator",
    "LocalPcaDimensionEstimator",
    "LowRankBilinearEstimator",
    "MeanDifferenceClassifier",
    "Probe",
    "ProbeManager",
    "Probing",
    "SteeringVectors",
    "TwoNnDimensionEstimator",
]
