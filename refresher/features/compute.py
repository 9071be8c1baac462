"""The named daily feature computations: one symbol's bars in, float columns on the same index out.

Every function takes a DataFrame indexed by session date with open/high/low/close/volume columns and returns a
DataFrame on the same index with float columns. Rows before a window fills are NULL (NaN here, NULL in the
database): each docstring states the window and how many leading rows stay NULL on a symbol's first bars.
Windows count sessions, not calendar days.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

TRADING_DAYS = 252


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
    """20-session channel and breakouts from it.

    - ``high_20d``, ``low_20d``: highest high and lowest low of the last 20 sessions, today included
      (first 19 rows NULL).
    - ``breakout_up``, ``breakout_down``: 1.0 when today's close is above yesterday's ``high_20d`` (below
      yesterday's ``low_20d``), else 0.0 (first 20 rows NULL).
    - ``range_position``: where the close sits in today's channel, 0 at ``low_20d`` and 1 at ``high_20d``
      (first 19 rows NULL; NULL when the channel is flat).
    """
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
    """Moving-average trend and Wilder's trend strength.

    - ``sma_20``, ``sma_50``: simple moving averages of the close (first 19 / 49 rows NULL).
    - ``sma_20_slope``: ``sma_20``'s average change per session over the last 5 sessions (first 24 rows NULL).
    - ``trend_up``: 1.0 while ``sma_20`` is above ``sma_50``, else 0.0 (first 49 rows NULL).
    - ``adx_14``: Wilder's average directional index, 0-100, smoothing 14 (first 26 rows NULL).
    """
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
    """Returns, volatility, RSI, MACD and Bollinger bands of the close.

    - ``return_1d``, ``log_return_1d``: simple and log return from the previous close (first row NULL).
    - ``volatility_20d``: standard deviation of ``return_1d`` over 20 sessions, annualised by sqrt(252)
      (first 20 rows NULL).
    - ``rsi_14``: Wilder's relative strength index, 0-100, smoothing 14 (first 14 rows NULL).
    - ``macd``: EMA(12) - EMA(26) of the close; ``macd_signal``: EMA(9) of ``macd``. Both start at the first
      bar (no NULLs) and settle after about 35 sessions.
    - ``bollinger_mid``, ``bollinger_upper``, ``bollinger_lower``: 20-session SMA and it +/- 2 sample standard
      deviations (first 19 rows NULL).
    """
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
    """Performance of holding the symbol from its first bar in the frame.

    - ``cumulative_return``: close / first close - 1 (no NULLs).
    - ``drawdown``: distance below the running peak of the close, <= 0 (no NULLs).
    - ``max_drawdown``: the worst ``drawdown`` so far, never increasing (no NULLs).
    - ``rolling_sharpe_63d``: mean / standard deviation of daily returns over up to 63 sessions, annualised by
      sqrt(252), zero risk-free rate; needs 20 returns (first 20 rows NULL).
    """
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
    """A stable stand-in for a live feed, for UI tests (daily bars carry no ticks).

    - ``last_price``: the close.
    - ``spread_proxy``: (high - low) / close.
    - ``tick_count``: volume in round lots of 100, rounded up.

    No window, no NULLs.
    """
    return pd.DataFrame(
        {
            "last_price": df["close"].astype(float),
            "spread_proxy": (df["high"] - df["low"]) / df["close"],
            "tick_count": np.ceil(df["volume"].astype(float) / 100.0),
        },
        index=df.index,
    )


def dashboard_data(df: pd.DataFrame) -> pd.DataFrame:
    """The numbers a quote dashboard shows.

    - ``daily_change``: close - previous close (first row NULL).
    - ``pct_change``: the same in percent of the previous close (first row NULL).
    - ``volume_ratio_20d``: volume / its 20-session average, today included (first 19 rows NULL).
    """
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
    """Liquidity and tracking proxies for ETFs, from their own bars (no NAV or holdings data).

    - ``avg_dollar_volume_20d``: 20-session mean of close x volume (first 19 rows NULL).
    - ``tracking_proxy``: close / 20-session SMA - 1, in units of the 20-session standard deviation of daily
      returns: how far the price strays from its own mean (first 20 rows NULL).
    - ``premium_proxy``: overnight gap, open / previous close - 1 (first row NULL).
    """
    close = df["close"]
    ret = close.pct_change()
    dollar_volume = close * df["volume"].astype(float)
    return pd.DataFrame(
        {
            "avg_dollar_volume_20d": _sma(dollar_volume, 20),
            "tracking_proxy": (close / _sma(close, 20) - 1) / ret.rolling(20, min_periods=20).std(),
            "premium_proxy": (df["open"] - close.shift(1)) / close.shift(1),
        },
        index=df.index,
    )


def correlation_analysis(df: pd.DataFrame) -> pd.DataFrame:
    """Co-movement with the universe's equal-weight index (a ``benchmark`` close column, see
    ``equal_weight_index``).

    - ``corr_60d``: Pearson correlation of daily returns with the benchmark's over up to 60 sessions, -1..1.
    - ``beta_60d``: covariance of those returns / the benchmark's return variance over the same window.

    Both need 20 return pairs (first 20 rows NULL).
    """
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


def equal_weight_index(bars: Mapping[str, pd.DataFrame]) -> pd.Series:
    """The equal-weight index of the universe's closes (each symbol rebased to 1 on its first day)."""
    closes = pd.DataFrame({sym: df["close"] for sym, df in bars.items()}).sort_index()
    rets = closes.pct_change().mean(axis=1, skipna=True).fillna(0.0)
    return (1 + rets).cumprod().rename("benchmark")


__all__ = [
    "correlation_analysis",
    "dashboard_data",
    "equal_weight_index",
    "etf_metadata",
    "full_analysis",
    "high_low_detection",
    "performance_metrics",
    "trend_analysis",
    "websocket_testing",
]
