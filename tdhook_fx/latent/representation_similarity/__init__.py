"""Representation similarity (tdhook.latent.representation_similarity): TensorDict modules that
compare two representations of the same N points."""

from tdhook_fx.latent.representation_similarity.cka import CkaEstimator
from tdhook_fx.latent.representation_similarity.information_imbalance import InformationImbalanceEstimator

__all__ = ["CkaEstimator", "InformationImbalanceEstimator"]
