"""Every indicator the features compute, against TA-Lib, the field's reference implementation.

Where the definitions are the same (SMA, rolling max/min, standard deviation, Bollinger bands, correlation, beta)
the numbers agree to rounding from the first full window. Where TA-Lib seeds a recursive average differently
(Wilder's RSI and ADX start from a simple mean; MACD's EMAs too), ours start from the first bar: the two agree to
1e-6 once the seed has decayed (300 sessions here), which is what the test holds us to.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import talib

from refresher.calendar import get_calendar
from refresher.features import compute_universe, equal_weight_index, get_feature
from refresher.profile import Listing
from refresher.sources.synthetic import generate_daily

SETTLED = 300  # sessions after which a recursive average's seed no longer shows at 1e-6


def bars(symbol: str) -> pd.DataFrame:
    table = generate_daily(
        Listing(symbol, "XNYS", "equity", 5), get_calendar("XNYS"), dt.date(2021, 1, 1), dt.date(2024, 12, 31)
    )
    df: pd.DataFrame = table.to_pandas().drop(columns="symbol")
    return df.set_index(pd.DatetimeIndex(pd.to_datetime(df.pop("date")), name="date"))


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return bars("AAA")


def arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        df["high"].to_numpy(dtype="float64"),
        df["low"].to_numpy(dtype="float64"),
        df["close"].to_numpy(dtype="float64"),
    )


def agree(ours: pd.Series, reference: np.ndarray, *, rel: float = 1e-9, start: int = 0) -> None:
    """Equal where both are defined from ``start`` on, and defined on the same rows from there."""
    mine = ours.to_numpy(dtype="float64")[start:]
    ref = np.asarray(reference, dtype="float64")[start:]
    assert np.array_equal(np.isnan(mine), np.isnan(ref)), (np.isnan(mine).sum(), np.isnan(ref).sum())
    both = ~np.isnan(ref)
    assert both.sum() > 100
    np.testing.assert_allclose(mine[both], ref[both], rtol=rel, atol=0)


def test_moving_averages_and_channels(df: pd.DataFrame) -> None:
    high, low, close = arrays(df)
    trend = get_feature("trend_analysis").compute(df)
    agree(trend["sma_20"], talib.SMA(close, 20))
    agree(trend["sma_50"], talib.SMA(close, 50))
    channel = get_feature("high_low_detection").compute(df)
    agree(channel["high_20d"], talib.MAX(high, 20))
    agree(channel["low_20d"], talib.MIN(low, 20))


def test_adx_converges_to_wilder(df: pd.DataFrame) -> None:
    high, low, close = arrays(df)
    trend = get_feature("trend_analysis").compute(df)
    agree(trend["adx_14"], talib.ADX(high, low, close, 14), rel=1e-6, start=SETTLED)
    fast = compute_universe("trend_analysis", {"AAA": df}, {"adx": 10, "fast": 5, "slow": 15})["AAA"]
    agree(fast["adx_10"], talib.ADX(high, low, close, 10), rel=1e-6, start=SETTLED)
    agree(fast["sma_5"], talib.SMA(close, 5))


def test_rsi_macd_bollinger_volatility(df: pd.DataFrame) -> None:
    _high, _low, close = arrays(df)
    full = get_feature("full_analysis").compute(df)
    agree(full["rsi_14"], talib.RSI(close, 14), rel=1e-6, start=SETTLED)
    macd, signal, _hist = talib.MACD(close, 12, 26, 9)
    agree(full["macd"], macd, rel=1e-6, start=SETTLED)
    agree(full["macd_signal"], signal, rel=1e-6, start=SETTLED)
    upper, mid, lower = talib.BBANDS(close, 20, 2.0, 2.0, 0)
    agree(full["bollinger_mid"], mid)
    # TA-Lib's bands use the population standard deviation, ours the sample one (as pandas and most papers do).
    sample = np.sqrt(20 / 19)
    agree(full["bollinger_upper"] - full["bollinger_mid"], (upper - mid) * sample)
    agree(full["bollinger_mid"] - full["bollinger_lower"], (mid - lower) * sample)
    returns = pd.Series(close).pct_change().to_numpy()
    agree(full["volatility_20d"], talib.STDDEV(returns, 20, 1.0) * sample * np.sqrt(252))


def test_correlation_and_beta_to_the_benchmark(df: pd.DataFrame) -> None:
    universe = {"AAA": df, "BBB": bars("BBB"), "CCC": bars("CCC")}
    out = compute_universe("correlation_analysis", universe)["AAA"]
    bench = equal_weight_index(universe).reindex(df.index).to_numpy(dtype="float64")
    close = df["close"].to_numpy(dtype="float64")
    returns, bench_returns = (
        pd.Series(close).pct_change().to_numpy(),
        pd.Series(bench).pct_change().to_numpy(),
    )
    # Ours start with 20 return pairs and grow to 60; TA-Lib's need the full 60 (compare from there).
    agree(out["corr_60d"], talib.CORREL(returns, bench_returns, 60), start=61)
    agree(out["beta_60d"], talib.BETA(bench, close, 60), start=61)
