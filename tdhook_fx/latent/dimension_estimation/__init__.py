"""Intrinsic dimension estimators (tdhook.latent.dimension_estimation): TensorDict modules that
read points (N, D) or (..., N, D) at `in_key` and write dimensions at `out_key`."""

from tdhook_fx.latent.dimension_estimation.ca_pca import CaPcaDimensionEstimator
from tdhook_fx.latent.dimension_estimation.local_knn import LocalKnnDimensionEstimator
from tdhook_fx.latent.dimension_estimation.local_pca import LocalPcaDimensionEstimator
from tdhook_fx.latent.dimension_estimation.twonn import TwoNnDimensionEstimator

__all__ = [
    "CaPcaDimensionEstimator",
    "LocalKnnDimensionEstimator",
    "LocalPcaDimensionEstimator",
    "TwoNnDimensionEstimator",
]
