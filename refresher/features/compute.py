"""The named daily feature computations: one symbol's bars in, float columns on the same index out.

Every function takes a DataFrame indexed by session date with open/high/low/close/volume columns and returns a
DataFrame on the same index with float columns. Rows before a window fills are NULL (NaN here, NULL in the
database): each docstring states the window and how many leading rows stay NULL on a symbol's first bars.
Windows count sessions, not calendar days.

Parameters are keyword-only with their defaults in the signature; a profile overrides them per entry
(``{name: trend_analysis, as: trend_fast, params: {fast: 10, slow: 30}}``) and ``registry`` validates them
from these annotations. Column names carry the window (``sma_20``), so a table never claims a window it was
not computed with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from refresher._lazy import LazyModule
from refresher.features.modules import module_source

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:
    # Imported at the first computation, not with the signatures `registry` reads when a profile loads.
    np = LazyModule("numpy")
    pd = LazyModule("pandas")

TRADING_DAYS = 252

# A window in sessions: at least 2, since a one-session standard deviation or channel means nothing.
Window = Annotated[int, Field(ge=2, le=10_000)]
Positive = Annotated[float, Field(gt=0)]


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


def high_low_detection(df: pd.DataFrame, *, window: Window = 20) -> pd.DataFrame:
    """A ``window``-session channel (default 20, the window in the names below) and breakouts from it.

    - ``high_20d``, ``low_20d``: highest high and lowest low of the last 20 sessions, today included
      (first 19 rows NULL).
    - ``breakout_up``, ``breakout_down``: 1.0 when today's close is above yesterday's ``high_20d`` (below
      yesterday's ``low_20d``), else 0.0 (first 20 rows NULL).
    - ``range_position``: where the close sits in today's channel, 0 at ``low_20d`` and 1 at ``high_20d``
      (first 19 rows NULL; NULL when the channel is flat).
    """
    high20 = df["high"].rolling(window, min_periods=window).max()
    low20 = df["low"].rolling(window, min_periods=window).min()
    prev_high, prev_low = high20.shift(1), low20.shift(1)
    return pd.DataFrame(
        {
            f"high_{window}d": high20,
            f"low_{window}d": low20,
            "breakout_up": (df["close"] > prev_high).astype(float).where(prev_high.notna()),
            "breakout_down": (df["close"] < prev_low).astype(float).where(prev_low.notna()),
            "range_position": (df["close"] - low20) / (high20 - low20).replace(0.0, np.nan),
        },
        index=df.index,
    )


def trend_analysis(
    df: pd.DataFrame, *, fast: Window = 20, slow: Window = 50, slope: Window = 5, adx: Window = 14
) -> pd.DataFrame:
    """Moving-average trend and Wilder's trend strength; defaults fast=20, slow=50 (fast < slow), slope=5,
    adx=14, and the column names below at those defaults.

    - ``sma_20``, ``sma_50``: simple moving averages of the close (first 19 / 49 rows NULL).
    - ``sma_20_slope``: ``sma_20``'s average change per session over the last 5 sessions (first 24 rows NULL).
    - ``trend_up``: 1.0 while ``sma_20`` is above ``sma_50``, else 0.0 (first 49 rows NULL).
    - ``adx_14``: Wilder's average directional index, 0-100, smoothing 14 (first 26 rows NULL).
    """
    close = df["close"]
    sma20, sma50 = _sma(close, fast), _sma(close, slow)
    # Wilder's directional movement, the "ADX-ish" trend strength
    up, down = df["high"].diff(), -df["low"].diff()
    plus_dm = up.where((up > down) & (up > 0), 0.0)
    minus_dm = down.where((down > up) & (down > 0), 0.0)
    atr = _true_range(df).ewm(alpha=1 / adx, adjust=False, min_periods=adx).mean()
    plus_di = 100 * plus_dm.ewm(alpha=1 / adx, adjust=False, min_periods=adx).mean() / atr
    minus_di = 100 * minus_dm.ewm(alpha=1 / adx, adjust=False, min_periods=adx).mean() / atr
    dx = 100 * (plus_di - minus_di).abs() / (plus_di + minus_di).replace(0.0, np.nan)
    return pd.DataFrame(
        {
            f"sma_{fast}": sma20,
            f"sma_{slow}": sma50,
            f"sma_{fast}_slope": sma20.diff(slope) / slope,
            "trend_up": (sma20 > sma50).astype(float).where(sma50.notna()),
            f"adx_{adx}": dx.ewm(alpha=1 / adx, adjust=False, min_periods=adx).mean(),
        },
        index=df.index,
    )


def full_analysis(
    df: pd.DataFrame,
    *,
    volatility: Window = 20,
    rsi: Window = 14,
    macd_fast: Window = 12,
    macd_slow: Window = 26,
    macd_signal: Window = 9,
    bollinger: Window = 20,
    bollinger_k: Positive = 2.0,
) -> pd.DataFrame:
    """Returns, volatility, RSI, MACD and Bollinger bands of the close; the windows below are the defaults
    (``volatility``, ``rsi``, ``macd_fast`` < ``macd_slow``, ``macd_signal``, ``bollinger``, ``bollinger_k``).

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
    ema_fast = close.ewm(span=macd_fast, adjust=False).mean()
    ema_slow = close.ewm(span=macd_slow, adjust=False).mean()
    macd = ema_fast - ema_slow
    mid, sd = _sma(close, bollinger), close.rolling(bollinger, min_periods=bollinger).std()
    return pd.DataFrame(
        {
            "return_1d": ret,
            "log_return_1d": np.log(close).diff(),
            f"volatility_{volatility}d": ret.rolling(volatility, min_periods=volatility).std()
            * np.sqrt(TRADING_DAYS),
            f"rsi_{rsi}": _rsi(close, rsi),
            "macd": macd,
            "macd_signal": macd.ewm(span=macd_signal, adjust=False).mean(),
            "bollinger_mid": mid,
            "bollinger_upper": mid + bollinger_k * sd,
            "bollinger_lower": mid - bollinger_k * sd,
        },
        index=df.index,
    )


def performance_metrics(df: pd.DataFrame, *, sharpe: Window = 63, min_returns: Window = 20) -> pd.DataFrame:
    """Performance of holding the symbol from its first bar in the frame; defaults sharpe=63, min_returns=20.

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
    mean = ret.rolling(sharpe, min_periods=min(min_returns, sharpe)).mean()
    sd = ret.rolling(sharpe, min_periods=min(min_returns, sharpe)).std()
    return pd.DataFrame(
        {
            "cumulative_return": growth - 1,
            "drawdown": growth / peak - 1,
            "max_drawdown": (growth / peak - 1).cummin(),
            f"rolling_sharpe_{sharpe}d": mean / sd.replace(0.0, np.nan) * np.sqrt(TRADING_DAYS),
        },
        index=df.index,
    )


def websocket_testing(df: pd.DataFrame, *, lot: Annotated[int, Field(ge=1)] = 100) -> pd.DataFrame:
    """What a live feed would have shown by each session's close, from its minute bars (``df`` as
    ``intraday_session`` takes it), for UI and websocket tests.

    - ``last_price``: the session's last minute close.
    - ``spread_proxy``: the median over the session's minutes of (high - low) / close.
    - ``tick_count``: trades in round lots of ``lot`` shares (default 100): the sum over minutes of
      volume / lot rounded up.

    One row per session, each from that session's bars only; no NULLs.
    """
    frame = pd.DataFrame(
        {
            "session": df["session"],
            "close": df["close"].astype(float),
            "spread": (df["high"] - df["low"]) / df["close"],
            "lots": np.ceil(df["volume"].astype(float) / float(lot)),
        }
    )
    g = frame.groupby("session", sort=True)
    out = pd.DataFrame(
        {"last_price": g["close"].last(), "spread_proxy": g["spread"].median(), "tick_count": g["lots"].sum()}
    )
    out.index = pd.DatetimeIndex(pd.to_datetime(out.index), name="date")
    return out


def dashboard_data(df: pd.DataFrame, *, volume_window: Window = 20) -> pd.DataFrame:
    """The numbers a quote dashboard shows; default volume_window=20.

    - ``daily_change``: close - previous close (first row NULL).
    - ``pct_change``: the same in percent of the previous close (first row NULL).
    - ``volume_ratio_20d``: volume / its 20-session average, today included (first 19 rows NULL).
    """
    close, volume = df["close"], df["volume"].astype(float)
    return pd.DataFrame(
        {
            "daily_change": close.diff(),
            "pct_change": close.pct_change() * 100,
            f"volume_ratio_{volume_window}d": volume / _sma(volume, volume_window),
        },
        index=df.index,
    )


def etf_metadata(df: pd.DataFrame, *, window: Window = 20) -> pd.DataFrame:
    """Liquidity and tracking proxies for ETFs, from their own bars (no NAV or holdings data); window=20.

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
            f"avg_dollar_volume_{window}d": _sma(dollar_volume, window),
            "tracking_proxy": (close / _sma(close, window) - 1)
            / ret.rolling(window, min_periods=window).std(),
            "premium_proxy": (df["open"] - close.shift(1)) / close.shift(1),
        },
        index=df.index,
    )


def correlation_analysis(df: pd.DataFrame, *, window: Window = 60, min_pairs: Window = 20) -> pd.DataFrame:
    """Co-movement with the universe's equal-weight index (a ``benchmark`` close column, see
    ``equal_weight_index``); defaults window=60, min_pairs=20.

    - ``corr_60d``: Pearson correlation of daily returns with the benchmark's over up to 60 sessions, -1..1.
    - ``beta_60d``: covariance of those returns / the benchmark's return variance over the same window.

    Both need 20 return pairs (first 20 rows NULL).
    """
    if "benchmark" not in df.columns:
        raise ValueError("correlation_analysis needs a 'benchmark' close column: use compute_universe()")
    ret, bench = df["close"].pct_change(), df["benchmark"].pct_change()
    need = min(min_pairs, window)
    cov = ret.rolling(window, min_periods=need).cov(bench)
    return pd.DataFrame(
        {
            f"corr_{window}d": ret.rolling(window, min_periods=need).corr(bench),
            f"beta_{window}d": cov / bench.rolling(window, min_periods=need).var(),
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
    "intraday_session",
    "performance_metrics",
    "trend_analysis",
    "websocket_testing",
]


def intraday_session(
    df: pd.DataFrame, *, opening_range: Annotated[int, Field(ge=1, le=600)] = 30
) -> pd.DataFrame:
    """One row per session from its minute bars (``df``: indexed by each bar's UTC start, with a ``session``
    column holding the exchange-local session date; a Tokyo session spans its lunch break).

    - ``vwap``: sum(close x volume) / sum(volume) over the session's bars; NULL when nothing traded.
    - ``intraday_return``: the last close / the first open - 1.
    - ``realized_vol``: sqrt of the sum of squared log returns between adjacent minutes of the session; a return
      across a gap (Tokyo's lunch break, a missing bar) or across sessions is never counted.
    - ``opening_range_high``, ``opening_range_low``: highest high and lowest low of the bars starting within
      ``opening_range`` minutes (default 30) of the session's first bar.
    - ``dollar_volume``: sum(close x volume).
    - ``minutes``: the number of bars.

    Every value is computed within one session (no window crosses a session boundary), so there is no warm-up:
    no NULLs except ``vwap`` on a session without volume.
    """
    session = df["session"]
    close, volume = df["close"].astype(float), df["volume"].astype(float)
    ts = pd.Series(df.index, index=df.index)
    adjacent = (ts.diff() == pd.Timedelta(minutes=1)) & session.eq(session.shift(1))
    log_ret = pd.Series(np.log(close / close.shift(1)), index=df.index).where(adjacent)
    opening = ts < ts.groupby(session).transform("min") + pd.Timedelta(minutes=opening_range)
    frame = pd.DataFrame(
        {
            "session": session,
            "pv": close * volume,
            "volume": volume,
            "open": df["open"].astype(float),
            "close": close,
            "sq": log_ret**2,
            "or_high": df["high"].astype(float).where(opening),
            "or_low": df["low"].astype(float).where(opening),
        }
    )
    g = frame.groupby("session", sort=True)
    sums = g[["pv", "volume", "sq"]].sum(min_count=0)
    out = pd.DataFrame(
        {
            "vwap": sums["pv"] / sums["volume"].replace(0.0, np.nan),
            "intraday_return": g["close"].last() / g["open"].first() - 1,
            "realized_vol": np.sqrt(sums["sq"]),
            "opening_range_high": g["or_high"].max(),
            "opening_range_low": g["or_low"].min(),
            "dollar_volume": sums["pv"],
            "minutes": g.size().astype(float),
        }
    )
    out.index = pd.DatetimeIndex(pd.to_datetime(out.index), name="date")
    return out


# The source this process runs, read as it is imported: a built-in feature's key hashes it (cached._built_in_code),
# and read only when first asked, a long-lived worker whose checkout moved on keyed the old code's rows by the new.
module_source(__name__)
