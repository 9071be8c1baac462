"""The features a profile can name: each a versioned computation, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pandas as pd

from refresher.errors import ProfileError
from refresher.features import compute

Compute = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class FeatureSpec:
    """A named, versioned feature computation; ``needs_universe`` features read a ``benchmark`` column.

    ``version`` is part of the feature-store key: bump it when the numbers a feature produces change.
    """

    name: str
    version: str
    compute: Compute
    needs_universe: bool = False


FEATURES: Mapping[str, FeatureSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            FeatureSpec("high_low_detection", "1", compute.high_low_detection),
            FeatureSpec("trend_analysis", "1", compute.trend_analysis),
            FeatureSpec("full_analysis", "1", compute.full_analysis),
            FeatureSpec("performance_metrics", "1", compute.performance_metrics),
            FeatureSpec("websocket_testing", "1", compute.websocket_testing),
            FeatureSpec("dashboard_data", "1", compute.dashboard_data),
            FeatureSpec("etf_metadata", "1", compute.etf_metadata),
            FeatureSpec("correlation_analysis", "1", compute.correlation_analysis, needs_universe=True),
        )
    }
)


def get_feature(name: str) -> FeatureSpec:
    """The feature called ``name``, or ProfileError naming it and the choices."""
    try:
        return FEATURES[name]
    except KeyError:
        raise ProfileError(
            "(features)", "features", name, f"unknown feature (choices: {', '.join(FEATURES)})"
        ) from None


def compute_universe(name: str, bars: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Feature ``name`` for every symbol of a universe; universe features see the equal-weight benchmark."""
    spec = get_feature(name)
    if not spec.needs_universe:
        return {sym: spec.compute(df) for sym, df in bars.items()}
    bench = compute.equal_weight_index(bars)
    return {sym: spec.compute(df.assign(benchmark=bench.reindex(df.index))) for sym, df in bars.items()}


__all__ = ["FEATURES", "Compute", "FeatureSpec", "compute_universe", "get_feature"]
