"""Fixtures of the featurestore tests: a store on a fresh root and small market-like frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featurestore import FeatureStore


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "cache")


def make_bars(rows: int = 500, *, seed: int = 0, tz: str = "UTC") -> pd.DataFrame:
    """Minute bars with a DatetimeIndex, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-03-01 14:30", periods=rows, freq="min", tz="UTC").tz_convert(tz)
    close = 100 + rng.standard_normal(rows).cumsum()
    return pd.DataFrame({"close": close, "volume": rng.integers(1, 1000, rows)}, index=index)


@pytest.fixture
def bars() -> pd.DataFrame:
    return make_bars()
