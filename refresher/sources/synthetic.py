"""Deterministic synthetic OHLCV: realistic-looking bars from (seed, symbol, session date) alone.

Each session is generated independently, so any month can be produced without its neighbours, yet prices are
continuous across sessions: a session opens near an *anchor* price for its date and its minute path is a
Brownian bridge to the anchor of the next calendar day, where the next session opens again. The anchor is
multi-scale value noise (hashed knots at 5, 21, 84 and 336 days) plus a drift, so it wanders like a random
walk while being a pure function of the date. Minute randomness comes from one numpy Generator per session,
seeded from a stable xxhash of (seed, symbol, session date); everything else is vectorised over the segment.

Daily bars are the exact aggregate of the session's minute bars (generating a month of minutes for one symbol
takes about a millisecond, so there is no separate daily model to keep consistent).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import xxhash

from refresher.calendar import ExchangeCalendar, get_calendar, minutes_by_session
from refresher.errors import ProfileError, SourceError
from refresher.profile import Listing
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA, empty_table
from refresher.segments import Segment
from refresher.sources.base import Source, effective_range

# Bump whenever the numbers this module produces change: it is part of every synthetic segment's version.
GENERATOR_VERSION = "1"

F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]
_OCTAVES = ((5.0, 0), (21.0, 1), (84.0, 2), (336.0, 3))  # (knot spacing in days, octave id)
_DAY0 = dt.date(2020, 1, 1).toordinal() - dt.date(1970, 1, 1).toordinal()
_MIN_PER_DAY_REF = 390.0


def _key(*parts: object) -> int:
    """A stable 64-bit key of the parts (xxhash, never Python's randomised hash())."""
    return xxhash.xxh64_intdigest("\x1f".join(str(p) for p in parts).encode())


def _splitmix(x: U64) -> U64:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def _hash_normal(key: int, octave: int, knots: npt.NDArray[np.int64]) -> F64:
    """A standard normal per knot, a pure function of (key, octave, knot)."""
    with np.errstate(over="ignore"):
        base = np.uint64(key) ^ np.uint64(octave << 56)
        x = knots.astype(np.uint64) * np.uint64(2) + base
    u1 = (_splitmix(x) >> np.uint64(11)).astype(np.float64) / 2.0**53
    u2 = (_splitmix(x + np.uint64(1)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.asarray(np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2), dtype=np.float64)


class _Params:
    """A symbol's fixed character: price level, volatility, drift, volume; derived from (seed, symbol)."""

    def __init__(self, listing: Listing) -> None:
        self.key = _key("params", listing.seed, listing.symbol)
        u = _splitmix(np.arange(5, dtype=np.uint64) + np.uint64(self.key)).astype(np.float64) / 2.0**64
        self.log_base = float(np.log(10.0) + u[0] * np.log(60.0))  # 10 .. 600
        self.daily_vol = float(0.01 + 0.02 * u[1])
        self.drift_per_day = float((-0.05 + 0.25 * u[2]) / 365.0)
        self.minute_volume = float(np.exp(np.log(2_000.0) + u[3] * np.log(50.0)))  # 2k .. 100k per minute
        self.gap_vol = self.daily_vol * (0.15 + 0.2 * float(u[4]))

    def log_anchor(self, days: npt.NDArray[np.int64]) -> F64:
        """Log price anchor for days since 1970-01-01: drift plus multi-scale value noise."""
        t = (days - _DAY0).astype(np.float64)
        out = self.log_base + self.drift_per_day * t
        for spacing, octave in _OCTAVES:
            pos = t / spacing
            k = np.floor(pos).astype(np.int64)
            f = pos - k
            f = f * f * (3.0 - 2.0 * f)  # smoothstep: no kinks at the knots
            lo = _hash_normal(self.key, octave, k)
            hi = _hash_normal(self.key, octave, k + 1)
            # amplitude ~ sqrt(spacing) gives random-walk-like variance growth across scales
            out = out + 0.5 * self.daily_vol * np.sqrt(spacing) * (lo + (hi - lo) * f)
        return np.asarray(out, dtype=np.float64)


def generate_minutes(listing: Listing, cal: ExchangeCalendar, start: dt.date, end: dt.date) -> pa.Table:
    """Minute bars of ``listing`` for the sessions in [start, end] (MINUTE_SCHEMA)."""
    cols = _minute_columns(listing, cal, start, end)
    if cols is None:
        return empty_table("1m")
    ts, o, h, lo, c, v, _ = cols
    return _table(
        MINUTE_SCHEMA, listing.symbol, pa.array(ts // 1000, pa.timestamp("us", tz="UTC")), o, h, lo, c, v
    )


def generate_daily(listing: Listing, cal: ExchangeCalendar, start: dt.date, end: dt.date) -> pa.Table:
    """Daily bars of ``listing`` for the sessions in [start, end]: exact aggregates of the minute bars."""
    cols = _minute_columns(listing, cal, start, end)
    if cols is None:
        return empty_table("1d")
    _, o, h, lo, c, v, counts = cols
    starts = np.cumsum(counts) - counts
    ends = starts + counts - 1
    sl = cal.session_slice(start, end)
    dates = pa.array(cal.sessions[sl].astype(np.int32), pa.date32())
    return _table(
        DAILY_SCHEMA,
        listing.symbol,
        dates,
        o[starts],
        np.maximum.reduceat(h, starts),
        np.minimum.reduceat(lo, starts),
        c[ends],
        np.add.reduceat(v, starts),
    )


def _table(schema: pa.Schema, symbol: str, when: pa.Array, *cols: npt.NDArray[np.generic]) -> pa.Table:
    n = len(when)
    symbols = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([symbol])).cast(
        pa.string()
    )
    arrays = [symbols, when, *(pa.array(col) for col in cols)]
    return pa.Table.from_arrays(arrays, schema=schema)


_MinuteCols = tuple[npt.NDArray[np.int64], F64, F64, F64, F64, npt.NDArray[np.int64], npt.NDArray[np.int64]]


def _minute_columns(
    listing: Listing, cal: ExchangeCalendar, start: dt.date, end: dt.date
) -> _MinuteCols | None:
    sl, minutes, counts = minutes_by_session(cal, start, end)
    total = len(minutes)
    if total == 0:
        return None
    p = _Params(listing)
    days = cal.sessions[sl]
    # One Generator per session keeps any session reproducible on its own; the draws are all we loop for.
    z = np.empty((4, total))
    gap = np.empty(len(days))
    offset = 0
    for i, (day, n) in enumerate(zip(days.tolist(), counts.tolist(), strict=True)):
        rng = np.random.Generator(np.random.PCG64(_key("session", listing.seed, listing.symbol, day)))
        draws = rng.standard_normal(4 * n + 1)
        gap[i] = draws[0]
        z[:, offset : offset + n] = draws[1:].reshape(4, n)
        offset += n

    starts = np.cumsum(counts) - counts
    n_of = np.repeat(counts, counts).astype(np.float64)
    j = (np.arange(total) - np.repeat(starts, counts) + 1).astype(np.float64)  # 1..n within the session
    frac = j / n_of
    sigma = p.daily_vol / np.sqrt(_MIN_PER_DAY_REF)
    walk = np.cumsum(z[0] * sigma)
    before = np.repeat(np.concatenate(([0.0], walk))[starts], counts)  # walk value before each session
    walk = walk - before
    walk_end = np.repeat(walk[starts + counts - 1], counts)
    bridge = walk - frac * walk_end  # pinned to 0 at both ends of the session

    log_open = p.log_anchor(days) + p.gap_vol * gap
    log_target = p.log_anchor(days + 1)
    a, b = np.repeat(log_open, counts), np.repeat(log_target, counts)
    close = np.exp(a + frac * (b - a) + bridge)
    open_ = np.empty(total)
    open_[1:] = close[:-1]
    open_[starts] = np.exp(log_open)

    close, open_ = np.round(close, 2), np.round(open_, 2)
    wick = 0.6 * sigma
    high = np.round(np.maximum(open_, close) * np.exp(wick * np.abs(z[1])), 2)
    low = np.round(np.minimum(open_, close) * np.exp(-wick * np.abs(z[2])), 2)
    x = (j - 0.5) / n_of
    u_shape = 0.5 + 3.0 * (2.0 * x - 1.0) ** 2  # heavy at the open and the close, light at midday
    volume = np.maximum(1, np.rint(p.minute_volume * u_shape * np.exp(0.35 * z[3]))).astype(np.int64)
    return minutes, open_, high, low, close, volume, counts


@functools.cache
def _calendar_library_version() -> str:
    # From the package metadata: importing exchange_calendars costs 60 ms a no-op refresh need not pay.
    return importlib.metadata.version("exchange_calendars")


class SyntheticSource(Source):
    """The default source: deterministic bars for any listing, no external data needed."""

    kind = "synthetic"

    def _listing(self, segment: Segment) -> Listing:
        try:
            return self.profile.listing(segment.symbol)
        except ProfileError as exc:
            raise SourceError(
                f"{segment}: symbol not in profile {self.profile.name!r}", segment=str(segment)
            ) from exc

    def version(self, segment: Segment) -> str:
        listing = self._listing(segment)
        rng = effective_range(self.profile, segment)
        span = f"{rng[0]}..{rng[1]}" if rng else "empty"
        # the calendar library's version decides holidays, hence which bars exist
        return (
            f"synthetic/g{GENERATOR_VERSION}/xc{_calendar_library_version()}"
            f"/seed{listing.seed}/{listing.exchange}/{span}"
        )

    def fetch(self, segment: Segment) -> pa.Table:
        listing = self._listing(segment)
        rng = effective_range(self.profile, segment)
        if rng is None:
            return empty_table(segment.timeframe)
        cal = get_calendar(listing.exchange)
        gen = generate_daily if segment.timeframe == "1d" else generate_minutes
        return gen(listing, cal, *rng)


__all__ = ["GENERATOR_VERSION", "SyntheticSource", "generate_daily", "generate_minutes"]
