"""Features: named computations over a symbol's bars (``compute``), the names a profile may use
(``registry``), their loading into the profile's database through the feature store (``load``), and the
tables and ledger they land in (``tables``).

The names below are imported on first use (PEP 562): loading a profile imports ``registry``, and must not bring
the store, pyarrow and pandas with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refresher._lazy import lazy_attributes

if TYPE_CHECKING:
    from refresher.features.compute import equal_weight_index
    from refresher.features.load import FeatureCounts, refresh_features
    from refresher.features.registry import FEATURES, FeatureSpec, FeatureUse, compute_universe, get_feature
    from refresher.features.tables import feature_table

__getattr__ = lazy_attributes(
    __name__,
    {
        "compute": ("equal_weight_index",),
        "load": ("FeatureCounts", "refresh_features"),
        "registry": ("FEATURES", "FeatureSpec", "FeatureUse", "compute_universe", "get_feature"),
        "tables": ("feature_table",),
    },
)


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
