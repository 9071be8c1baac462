"""The feature registry over synthetic daily bars: every named feature computes sane, aligned numbers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from refresher.calendar import get_calendar
from refresher.errors import ProfileError
from refresher.features import FEATURES, compute_universe, equal_weight_index, get_feature
from refresher.profile import Listing
from refresher.sources.synthetic import generate_daily


def bars(symbol: str) -> pd.DataFrame:
    table = generate_daily(
        Listing(symbol, "XNYS", "equity", 5), get_calendar("XNYS"), dt.date(2024, 1, 1), dt.date(2024, 12, 31)
    )
    df: pd.DataFrame = table.to_pandas().drop(columns="symbol")
    return df.set_index(pd.DatetimeIndex(pd.to_datetime(df.pop("date")), name="date"))


@pytest.fixture(scope="module")
def universe() -> dict[str, pd.DataFrame]:
    return {s: bars(s) for s in ("AAA", "BBB", "CCC")}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_every_feature_is_float_and_aligned(name: str, universe: dict[str, pd.DataFrame]) -> None:
    out = compute_universe(name, universe)
    assert set(out) == set(universe)
    for sym, frame in out.items():
        assert frame.index.equals(universe[sym].index)
        assert all(np.issubdtype(t, np.floating) for t in frame.dtypes), frame.dtypes
        assert frame.iloc[60:].notna().all().all(), frame.iloc[60:].isna().sum()


def test_high_low_and_breakouts(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["AAA"]
    out = get_feature("high_low_detection").compute(df)
    assert (out["high_20d"].dropna() >= df["close"][out["high_20d"].notna()]).all()
    assert out["high_20d"].iloc[25] == df["high"].iloc[6:26].max()
    up = out["breakout_up"] == 1.0
    assert (df["close"][up] > out["high_20d"].shift(1)[up]).all()


def test_trend_and_full_analysis_values(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["BBB"]
    trend = get_feature("trend_analysis").compute(df)
    assert trend["sma_50"].iloc[60] == pytest.approx(df["close"].iloc[11:61].mean())
    assert trend["adx_14"].dropna().between(0, 100).all()
    full = get_feature("full_analysis").compute(df)
    assert full["rsi_14"].dropna().between(0, 100).all()
    assert (full["bollinger_upper"].dropna() >= full["bollinger_lower"].dropna()).all()


def test_performance_metrics(universe: dict[str, pd.DataFrame]) -> None:
    df = universe["CCC"]
    perf = get_feature("performance_metrics").compute(df)
    assert perf["cumulative_return"].iloc[-1] == pytest.approx(df["close"].iloc[-1] / df["close"].iloc[0] - 1)
    assert (perf["drawdown"] <= 0).all() and perf["max_drawdown"].is_monotonic_decreasing


def test_correlation_to_equal_weight_index(universe: dict[str, pd.DataFrame]) -> None:
    bench = equal_weight_index(universe)
    assert bench.iloc[0] == pytest.approx(1.0)
    out = compute_universe("correlation_analysis", universe)
    assert out["AAA"]["corr_60d"].dropna().between(-1, 1).all()
    with pytest.raises(ValueError, match="benchmark"):
        get_feature("correlation_analysis").compute(universe["AAA"])
    same = compute_universe("correlation_analysis", {"AAA": universe["AAA"]})["AAA"]
    assert same["corr_60d"].dropna().iloc[-1] == pytest.approx(1.0)


def test_unknown_feature_names_the_value() -> None:
    with pytest.raises(ProfileError) as info:
        get_feature("nope")
    assert info.value.value == "nope" and "high_low_detection" in str(info.value)
