"""Named feature computations over one symbol's daily bars, the ``features:`` of a profile.

Every feature takes a DataFrame indexed by session date with open/high/low/close/volume columns and returns a
DataFrame on the same index with float columns. ``version`` is part of the feature-store key: bump it when the
numbers a feature produces change. ``correlation_analysis`` needs the whole universe: call
``compute_universe`` with every symbol's bars, or pass a ``benchmark`` close column yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd

from refresher.errors import ProfileError

Compute = Callable[[pd.DataFrame], pd.DataFrame]
TRADING_DAYS = 252


@dataclass(frozen=True)
class FeatureSpec:
    """A named, versioned feature computation; ``needs_universe`` features read a ``benchmark`` column."""

    name: str
    version: str
    compute: Compute
    needs_universe: bool = False


def _sma(s: pd.Series, n: int) -> pd.Series:
    return s.rolling(n, min_periods=n).mean()


def _rsi(close: pd.Series, n: int = 14) -> pd.Series:
    delta = close.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / n, adjust=False, min_periods=n).mean()
    loss = (-delta.clip(upper=0)).ewm(alpha=1 / n, adjust=False, min_periods=n).mean()
    rs = gain / loss.replace(0.0, np.nan)
    return (100 - 100 / (1 + rs)).where(loss != 0, 100.0).where(gain.notna())


def _true_range(df: pd.DataFrame) -> pd.Series:
    prev = df["close"].shift(1)
    ranges = pd.concat([df["high"] - df["low"], (df["high"] - prev).abs(), (df["low"] - prev).abs()], axis=1)
    return ranges.max(axis=1)


def high_low_detection(df: pd.DataFrame) -> pd.DataFrame:
    high20 = df["high"].rolling(20, min_periods=20).max()
    low20 = df["low"].rolling(20, min_periods=20).min()
    prev_high, prev_low = high20.shift(1), low20.shift(1)
    return pd.DataFrame(
        {
            "high_20d": high20,
            "low_20d": low20,
            "breakout_up": (df["close"] > prev_high).astype(float).where(prev_high.notna()),
            "breakout_down": (df["close"] < prev_low).astype(float).where(prev_low.notna()),
            "range_position": (df["close"] - low20) / (high20 - low20).replace(0.0, np.nan),
        },
        index=df.index,
    )


def trend_analysis(df: pd.DataFrame) -> pd.DataFrame:
    close = df["close"]
    sma20, sma50 = _sma(close, 20), _sma(close, 50)
    # Wilder's directional movement, the "ADX-ish" trend strength
    up, down = df["high"].diff(), -df["low"].diff()
    plus_dm = up.where((up > down) & (up > 0), 0.0)
    minus_dm = down.where((down > up) & (down > 0), 0.0)
    atr = _true_range(df).ewm(alpha=1 / 14, adjust=False, min_periods=14).mean()
    plus_di = 100 * plus_dm.ewm(alpha=1 / 14, adjust=False, min_periods=14).mean() / atr
    minus_di = 100 * minus_dm.ewm(alpha=1 / 14, adjust=False, min_periods=14).mean() / atr
    dx = 100 * (plus_di - minus_di).abs() / (plus_di + minus_di).replace(0.0, np.nan)
    return pd.DataFrame(
        {
            "sma_20": sma20,
            "sma_50": sma50,
            "sma_20_slope": sma20.diff(5) / 5,
            "trend_up": (sma20 > sma50).astype(float).where(sma50.notna()),
            "adx_14": dx.ewm(alpha=1 / 14, adjust=False, min_periods=14).mean(),
        },
        index=df.index,
    )


def full_analysis(df: pd.DataFrame) -> pd.DataFrame:
    close = df["close"]
    ret = close.pct_change()
    ema12, ema26 = close.ewm(span=12, adjust=False).mean(), close.ewm(span=26, adjust=False).mean()
    macd = ema12 - ema26
    mid, sd = _sma(close, 20), close.rolling(20, min_periods=20).std()
    return pd.DataFrame(
        {
            "return_1d": ret,
            "log_return_1d": np.log(close).diff(),
            "volatility_20d": ret.rolling(20, min_periods=20).std() * np.sqrt(TRADING_DAYS),
            "rsi_14": _rsi(close),
            "macd": macd,
            "macd_signal": macd.ewm(span=9, adjust=False).mean(),
            "bollinger_mid": mid,
            "bollinger_upper": mid + 2 * sd,
            "bollinger_lower": mid - 2 * sd,
        },
        index=df.index,
    )


def performance_metrics(df: pd.DataFrame) -> pd.DataFrame:
    close = df["close"]
    ret = close.pct_change()
    growth = close / close.iloc[0] if len(close) else close
    peak = growth.cummax()
    mean, sd = ret.rolling(63, min_periods=20).mean(), ret.rolling(63, min_periods=20).std()
    return pd.DataFrame(
        {
            "cumulative_return": growth - 1,
            "drawdown": growth / peak - 1,
            "max_drawdown": (growth / peak - 1).cummin(),
            "rolling_sharpe_63d": mean / sd.replace(0.0, np.nan) * np.sqrt(TRADING_DAYS),
        },
        index=df.index,
    )


def websocket_testing(df: pd.DataFrame) -> pd.DataFrame:
    # Daily bars carry no ticks; a deterministic proxy (volume in round lots) keeps the UI test data stable.
    return pd.DataFrame(
        {
            "last_price": df["close"].astype(float),
            "spread_proxy": (df["high"] - df["low"]) / df["close"],
            "tick_count": np.ceil(df["volume"].astype(float) / 100.0),
        },
        index=df.index,
    )


def dashboard_data(df: pd.DataFrame) -> pd.DataFrame:
    close, volume = df["close"], df["volume"].astype(float)
    return pd.DataFrame(
        {
            "daily_change": close.diff(),
            "pct_change": close.pct_change() * 100,
            "volume_ratio_20d": volume / _sma(volume, 20),
        },
        index=df.index,
    )


def etf_metadata(df: pd.DataFrame) -> pd.DataFrame:
    close = df["close"]
    ret = close.pct_change()
    dollar_volume = close * df["volume"].astype(float)
    return pd.DataFrame(
        {
            "avg_dollar_volume_20d": _sma(dollar_volume, 20),
            # tracking proxy: how far the close strays from its own 20-day mean, in daily-volatility units
            "tracking_proxy": (close / _sma(close, 20) - 1) / ret.rolling(20, min_periods=20).std(),
            "premium_proxy": (df["open"] - close.shift(1)) / close.shift(1),
        },
        index=df.index,
    )


def correlation_analysis(df: pd.DataFrame) -> pd.DataFrame:
    if "benchmark" not in df.columns:
        raise ValueError("correlation_analysis needs a 'benchmark' close column: use compute_universe()")
    ret, bench = df["close"].pct_change(), df["benchmark"].pct_change()
    cov = ret.rolling(60, min_periods=20).cov(bench)
    return pd.DataFrame(
        {
            "corr_60d": ret.rolling(60, min_periods=20).corr(bench),
            "beta_60d": cov / bench.rolling(60, min_periods=20).var(),
        },
        index=df.index,
    )


FEATURES: Mapping[str, FeatureSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            FeatureSpec("high_low_detection", "1", high_low_detection),
            FeatureSpec("trend_analysis", "1", trend_analysis),
            FeatureSpec("full_analysis", "1", full_analysis),
            FeatureSpec("performance_metrics", "1", performance_metrics),
            FeatureSpec("websocket_testing", "1", websocket_testing),
            FeatureSpec("dashboard_data", "1", dashboard_data),
            FeatureSpec("etf_metadata", "1", etf_metadata),
            FeatureSpec("correlation_analysis", "1", correlation_analysis, needs_universe=True),
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


def equal_weight_index(bars: Mapping[str, pd.DataFrame]) -> pd.Series:
    """The equal-weight index of the universe's closes (each symbol rebased to 1 on its first day)."""
    closes = pd.DataFrame({sym: df["close"] for sym, df in bars.items()}).sort_index()
    rets = closes.pct_change().mean(axis=1, skipna=True).fillna(0.0)
    return (1 + rets).cumprod().rename("benchmark")


def compute_universe(name: str, bars: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Feature ``name`` for every symbol of a universe; universe features see the equal-weight benchmark."""
    spec = get_feature(name)
    if not spec.needs_universe:
        return {sym: spec.compute(df) for sym, df in bars.items()}
    bench = equal_weight_index(bars)
    return {sym: spec.compute(df.assign(benchmark=bench.reindex(df.index))) for sym, df in bars.items()}


__all__ = ["FEATURES", "FeatureSpec", "compute_universe", "equal_weight_index", "get_feature"]
