"""The registered daily features over many symbols at once: one pandas pass per feature, not one per symbol.

``SymbolFrames`` holds every symbol's bars in one frame, sorted by symbol then date. Its operations (shift, diff,
rolling windows, exponential averages, running extremes) never look across a symbol boundary, and they run the
very arithmetic the per-symbol functions in ``compute`` run, row for row:

- shifts and differences are elementwise, masked on each symbol's first rows;
- a rolling window is pandas' own rolling aggregation over window bounds clipped at each symbol's first row, and
  pandas starts its running sums afresh wherever a window shares no row with the one before (a new symbol), so
  a symbol's sums never carry rounding from the symbol before it;
- an exponential average is pandas' grouped ``ewm``, which runs the same recursion per symbol.

So each symbol's rows equal ``compute``'s function on that symbol alone, bit for bit (tests/refresher/
test_features_bulk.py holds every feature here to it). ``compute`` stays the definition: its source is part of
the feature store's key, and a user's function only has that form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pandas.api.indexers import BaseIndexer

from refresher._lazy import LazyModule
from refresher.features.compute import TRADING_DAYS
from refresher.features.modules import module_source

if TYPE_CHECKING:
    import pandas as pd
    from pandas.core.window.rolling import Rolling
else:
    pd = LazyModule("pandas")


class _SymbolWindows(BaseIndexer):  # type: ignore[misc]
    """Trailing windows of ``window_size`` rows clipped at the first row of each row's symbol."""

    def __init__(self, first_row: np.ndarray, window_size: int) -> None:
        super().__init__(window_size=window_size)
        self.first_row = first_row
        self.size = window_size

    def get_window_bounds(
        self,
        num_values: int = 0,
        min_periods: int | None = None,
        center: bool | None = None,
        closed: str | None = None,
        step: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        end = np.arange(1, num_values + 1, dtype=np.int64)
        start = np.maximum(end - self.size, self.first_row).astype(np.int64)
        return start, end


class SymbolFrames:
    """Many symbols' bars in one frame (``frame``, positional index, sorted by symbol then date) and the
    per-symbol operations the bulk features are written in."""

    def __init__(self, symbols: Sequence[str], frames: Sequence[pd.DataFrame]) -> None:
        self.symbols = list(symbols)
        self.lengths = np.array([len(f) for f in frames], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.frame = (
            pd.concat(list(frames), ignore_index=True) if frames else pd.DataFrame()
        )  # positional index: 0..n-1
        self.codes = np.repeat(np.arange(len(frames), dtype=np.int64), self.lengths)
        self.first_row = np.repeat(self.starts, self.lengths)
        self.position = np.arange(len(self.frame), dtype=np.int64) - self.first_row

    def split(self, result: pd.DataFrame, frames: Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
        """``result`` (one row per row of ``frame``) as one frame per symbol, on that symbol's own index."""
        parts = []
        for start, length, frame in zip(self.starts, self.lengths, frames, strict=True):
            part = result.iloc[start : start + length]
            part.index = frame.index
            parts.append(part)
        return parts

    def shift(self, s: pd.Series, n: int = 1) -> pd.Series:
        return s.shift(n).where(self.position >= n)

    def diff(self, s: pd.Series, n: int = 1) -> pd.Series:
        return s.diff(n).where(self.position >= n)

    def pct_change(self, s: pd.Series) -> pd.Series:
        # pandas' own pct_change is exactly this, on the shifted series
        return s / self.shift(s) - 1

    def rolling(self, s: pd.Series, window: int, min_periods: int) -> Rolling[pd.Series]:
        return s.rolling(_SymbolWindows(self.first_row, window), min_periods=min_periods)

    def sma(self, s: pd.Series, n: int) -> pd.Series:
        return self.rolling(s, n, n).mean()

    def ewm_mean(self, s: pd.Series, **kwargs: Any) -> pd.Series:
        out = s.groupby(self.codes, sort=False).ewm(**kwargs).mean()
        return pd.Series(out.to_numpy(), index=s.index)

    def cummax(self, s: pd.Series) -> pd.Series:
        return pd.Series(s.groupby(self.codes, sort=False).cummax(), index=s.index)

    def cummin(self, s: pd.Series) -> pd.Series:
        return pd.Series(s.groupby(self.codes, sort=False).cummin(), index=s.index)

    def first(self, s: pd.Series) -> pd.Series:
        return pd.Series(s.to_numpy()[self.first_row], index=s.index)


def _rsi(g: SymbolFrames, close: pd.Series, n: int) -> pd.Series:
    delta = g.diff(close)
    gain = g.ewm_mean(delta.clip(lower=0), alpha=1 / n, adjust=False, min_periods=n)
    loss = g.ewm_mean(-delta.clip(upper=0), alpha=1 / n, adjust=False, min_periods=n)
    rs = gain / loss.replace(0.0, np.nan)
    return (100 - 100 / (1 + rs)).where(loss != 0, 100.0).where(gain.notna())


def _true_range(g: SymbolFrames, df: pd.DataFrame) -> pd.Series:
    prev = g.shift(df["close"])
    ranges = pd.concat([df["high"] - df["low"], (df["high"] - prev).abs(), (df["low"] - prev).abs()], axis=1)
    return ranges.max(axis=1)


def high_low_detection(g: SymbolFrames, *, window: int) -> pd.DataFrame:
    df = g.frame
    high = g.rolling(df["high"], window, window).max()
    low = g.rolling(df["low"], window, window).min()
    prev_high, prev_low = g.shift(high), g.shift(low)
    return pd.DataFrame(
        {
            f"high_{window}d": high,
            f"low_{window}d": low,
            "breakout_up": (df["close"] > prev_high).astype(float).where(prev_high.notna()),
            "breakout_down": (df["close"] < prev_low).astype(float).where(prev_low.notna()),
            "range_position": (df["close"] - low) / (high - low).replace(0.0, np.nan),
        }
    )


def trend_analysis(g: SymbolFrames, *, fast: int, slow: int, slope: int, adx: int) -> pd.DataFrame:
    df = g.frame
    close = df["close"]
    sma_fast, sma_slow = g.sma(close, fast), g.sma(close, slow)
    up, down = g.diff(df["high"]), -g.diff(df["low"])
    plus_dm = up.where((up > down) & (up > 0), 0.0)
    minus_dm = down.where((down > up) & (down > 0), 0.0)
    smooth = {"alpha": 1 / adx, "adjust": False, "min_periods": adx}
    atr = g.ewm_mean(_true_range(g, df), **smooth)
    plus_di = 100 * g.ewm_mean(plus_dm, **smooth) / atr
    minus_di = 100 * g.ewm_mean(minus_dm, **smooth) / atr
    dx = 100 * (plus_di - minus_di).abs() / (plus_di + minus_di).replace(0.0, np.nan)
    return pd.DataFrame(
        {
            f"sma_{fast}": sma_fast,
            f"sma_{slow}": sma_slow,
            f"sma_{fast}_slope": g.diff(sma_fast, slope) / slope,
            "trend_up": (sma_fast > sma_slow).astype(float).where(sma_slow.notna()),
            f"adx_{adx}": g.ewm_mean(dx, **smooth),
        }
    )


def full_analysis(
    g: SymbolFrames,
    *,
    volatility: int,
    rsi: int,
    macd_fast: int,
    macd_slow: int,
    macd_signal: int,
    bollinger: int,
    bollinger_k: float,
) -> pd.DataFrame:
    close = g.frame["close"]
    ret = g.pct_change(close)
    macd = g.ewm_mean(close, span=macd_fast, adjust=False) - g.ewm_mean(close, span=macd_slow, adjust=False)
    mid, sd = g.sma(close, bollinger), g.rolling(close, bollinger, bollinger).std()
    return pd.DataFrame(
        {
            "return_1d": ret,
            "log_return_1d": g.diff(np.log(close)),
            f"volatility_{volatility}d": g.rolling(ret, volatility, volatility).std() * np.sqrt(TRADING_DAYS),
            f"rsi_{rsi}": _rsi(g, close, rsi),
            "macd": macd,
            "macd_signal": g.ewm_mean(macd, span=macd_signal, adjust=False),
            "bollinger_mid": mid,
            "bollinger_upper": mid + bollinger_k * sd,
            "bollinger_lower": mid - bollinger_k * sd,
        }
    )


def performance_metrics(g: SymbolFrames, *, sharpe: int, min_returns: int) -> pd.DataFrame:
    close = g.frame["close"]
    ret = g.pct_change(close)
    growth = close / g.first(close)
    peak = g.cummax(growth)
    need = min(min_returns, sharpe)
    mean = g.rolling(ret, sharpe, need).mean()
    sd = g.rolling(ret, sharpe, need).std()
    return pd.DataFrame(
        {
            "cumulative_return": growth - 1,
            "drawdown": growth / peak - 1,
            "max_drawdown": g.cummin(growth / peak - 1),
            f"rolling_sharpe_{sharpe}d": mean / sd.replace(0.0, np.nan) * np.sqrt(TRADING_DAYS),
        }
    )


def dashboard_data(g: SymbolFrames, *, volume_window: int) -> pd.DataFrame:
    close, volume = g.frame["close"], g.frame["volume"].astype(float)
    return pd.DataFrame(
        {
            "daily_change": g.diff(close),
            "pct_change": g.pct_change(close) * 100,
            f"volume_ratio_{volume_window}d": volume / g.sma(volume, volume_window),
        }
    )


def etf_metadata(g: SymbolFrames, *, window: int) -> pd.DataFrame:
    df = g.frame
    close = df["close"]
    ret = g.pct_change(close)
    prev = g.shift(close)
    return pd.DataFrame(
        {
            f"avg_dollar_volume_{window}d": g.sma(close * df["volume"].astype(float), window),
            "tracking_proxy": (close / g.sma(close, window) - 1) / g.rolling(ret, window, window).std(),
            "premium_proxy": (df["open"] - prev) / prev,
        }
    )


def correlation_analysis(g: SymbolFrames, *, window: int, min_pairs: int) -> pd.DataFrame:
    ret, bench = g.pct_change(g.frame["close"]), g.pct_change(g.frame["benchmark"])
    need = min(min_pairs, window)
    cov = g.rolling(ret, window, need).cov(bench)
    return pd.DataFrame(
        {
            f"corr_{window}d": g.rolling(ret, window, need).corr(bench),
            f"beta_{window}d": cov / g.rolling(bench, window, need).var(),
        }
    )


BulkCompute = Callable[..., "pd.DataFrame"]

# Registered name -> its bulk form; a feature not named here (a user's function) is computed symbol by symbol.
BULK: Mapping[str, BulkCompute] = {
    "high_low_detection": high_low_detection,
    "trend_analysis": trend_analysis,
    "full_analysis": full_analysis,
    "performance_metrics": performance_metrics,
    "dashboard_data": dashboard_data,
    "etf_metadata": etf_metadata,
    "correlation_analysis": correlation_analysis,
}


def compute_bulk(
    feature: str, params: Mapping[str, Any], symbols: Sequence[str], frames: Sequence[pd.DataFrame]
) -> list[pd.DataFrame]:
    """Registered daily feature ``feature`` for every symbol's frame in one pass; one result per frame."""
    nonempty = [i for i, f in enumerate(frames) if len(f)]
    results: list[pd.DataFrame | None] = [None] * len(frames)
    if nonempty:
        g = SymbolFrames([symbols[i] for i in nonempty], [frames[i] for i in nonempty])
        out = BULK[feature](g, **params)
        for i, part in zip(nonempty, g.split(out, [frames[i] for i in nonempty]), strict=True):
            results[i] = part
    return [r if r is not None else pd.DataFrame(index=f.index) for r, f in zip(results, frames, strict=True)]


__all__ = ["BULK", "SymbolFrames", "compute_bulk"]

# The source this process runs, read as it is imported: a built-in feature's key hashes it (cached._built_in_code),
# and read only when first asked, a long-lived worker whose checkout moved on keyed the old code's rows by the new.
module_source(__name__)
