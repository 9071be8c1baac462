"""Features: named computations over a symbol's bars (``compute``), the names a profile may use
(``registry``), and their loading into the profile's database through the feature store (``load``)."""

from refresher.features.compute import equal_weight_index
from refresher.features.load import FeatureCounts, feature_table, refresh_features
from refresher.features.registry import FEATURES, FeatureSpec, compute_universe, get_feature

__all__ = [
    "FEATURES",
    "FeatureCounts",
    "FeatureSpec",
    "compute_universe",
    "equal_weight_index",
    "feature_table",
    "get_feature",
    "refresh_features",
]
