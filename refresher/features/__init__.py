"""Features: named computations over a symbol's bars (``compute``), the names a profile may use
(``registry``), their loading into the profile's database through the feature store (``load``), and the
tables and ledger they land in (``tables``)."""

from refresher.features.compute import equal_weight_index
from refresher.features.load import FeatureCounts, refresh_features
from refresher.features.registry import FEATURES, FeatureSpec, FeatureUse, compute_universe, get_feature
from refresher.features.tables import feature_table

__all__ = [
    "FEATURES",
    "FeatureCounts",
    "FeatureSpec",
    "FeatureUse",
    "compute_universe",
    "equal_weight_index",
    "feature_table",
    "get_feature",
    "refresh_features",
]
