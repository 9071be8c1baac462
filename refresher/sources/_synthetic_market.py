"""The synthetic market: each session's daily bar drawn directly, and its minute bars fitted to it exactly.

Daily first. A session opens near an *anchor* price for its date and closes at the anchor of the next calendar
day, where the next session opens again, so prices are continuous across sessions, months and segments. The
anchor is multi-scale value noise (hashed knots at 5, 21, 84 and 336 days) plus a drift: it wanders like a
random walk while being a pure function of the date. The high and the low are the extremes of a Brownian bridge
from the open to the close over the session's length (a half day is shorter), drawn from their exact
distribution, P(max >= m) = exp(-2 (m - open)(m - close) / variance) in log prices, and the volume is lognormal
around the symbol's level. Every daily draw is a counter-based hash of (symbol key, draw, date): a session is
an elementwise function of its own inputs, so a daily bar never touches a minute and any batch of sessions is
computed at once, 1.26 M of them in about two seconds.

Minutes are derived. A session's minute path comes from its own ``PCG64`` stream seeded from (seed, symbol,
date): a random walk pinned as a Brownian bridge between the open and the close, wicks and a U-shaped volume.
A monotone piecewise-linear map of prices then sends the path's lowest low to the daily low, its open and close
to the daily open and close, and its highest high to the daily high (those four set exactly, the rest rounded
to cents and so within them); the daily volume is shared out in integers in proportion to the path's. The
minute bars therefore aggregate to the daily bar exactly, which nothing has to compute the other way round.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from refresher.calendar import ExchangeCalendar
from refresher.profile import Listing
from refresher.sources._pcg64_seeds import pcg64_states

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
_NS_PER_MIN = 60_000_000_000
_OCTAVES = ((5.0, 0), (21.0, 1), (84.0, 2), (336.0, 3))  # (knot spacing in days, octave id)
# The daily draws' ids, after the octaves': one independent hash stream each.
_GAP, _HIGH, _LOW, _VOLUME = 4, 5, 6, 7
_DAY0 = 18262  # 2020-01-01 in days since 1970-01-01: the drift's origin
_MIN_PER_DAY_REF = 390.0  # a regular session's minutes: the length the daily volatility is quoted for
# Daily volume: the mean of the minute model's (a U shape averaging 1.5 times exp(0.35 z)) times a day's own
# lognormal factor of mean 1.
_VOLUME_LEVEL = 1.5 * float(np.exp(0.35**2 / 2))
_DAY_VOLUME_SIGMA = 0.25


def _key(*parts: object) -> int:
    """A stable 64-bit key of the parts (xxhash, never Python's randomised hash())."""
    return xxhash.xxh64_intdigest("\x1f".join(str(p) for p in parts).encode())


def _splitmix(x: U64) -> U64:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def _hash_uniforms(key: U64, stream: int, counters: I64) -> tuple[F64, F64]:
    """Two uniforms in [0, 1) per counter, a pure function of (key, stream, counter); ``key`` holds one each."""
    with np.errstate(over="ignore"):
        x = counters.astype(np.uint64) * np.uint64(2) + (key ^ np.uint64(stream << 56))
    u1 = (_splitmix(x) >> np.uint64(11)).astype(np.float64) / 2.0**53
    u2 = (_splitmix(x + np.uint64(1)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return u1, u2


def _hash_normal(key: U64, stream: int, counters: I64) -> F64:
    """A standard normal per counter (Box-Muller), a pure function of (key, stream, counter)."""
    u1, u2 = _hash_uniforms(key, stream, counters)
    return np.asarray(np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2), dtype=np.float64)


def _hash_exponential(key: U64, stream: int, counters: I64) -> F64:
    """A standard exponential per counter, a pure function of (key, stream, counter)."""
    return np.asarray(-np.log1p(-_hash_uniforms(key, stream, counters)[0]), dtype=np.float64)


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


@functools.cache
def minutes_per_session(cal: ExchangeCalendar) -> I64:
    """Trading minutes of each of the calendar's sessions (a half day has fewer, a lunch break takes some)."""
    morning = (cal.break_starts - cal.opens) // _NS_PER_MIN
    afternoon = (cal.closes - cal.break_ends) // _NS_PER_MIN
    return np.asarray(morning + afternoon, dtype=np.int64)


@dataclass(frozen=True)
class Sessions:
    """Many listings' sessions side by side: each one's date, length and its symbol's parameters, as arrays."""

    runs: tuple[tuple[Listing, int], ...]  # (listing, how many sessions), in order
    days: I64  # session dates, days since 1970-01-01
    minutes: I64  # trading minutes
    key: U64
    log_base: F64
    daily_vol: F64
    drift_per_day: F64
    minute_volume: F64
    gap_vol: F64

    @classmethod
    def of(cls, listings: Sequence[Listing], counts: I64, days: I64, minutes: I64) -> Sessions:
        """``counts[i]`` sessions of ``listings[i]`` after those of the listings before it; ``days`` and
        ``minutes`` hold every session's date and trading minutes."""
        params: dict[Listing, _Params] = {}
        for listing in listings:
            if listing not in params:
                params[listing] = _Params(listing)
        of_run = [params[listing] for listing in listings]

        def per_session(name: str) -> F64:
            return np.repeat(np.array([getattr(p, name) for p in of_run], dtype=np.float64), counts)

        return cls(
            runs=tuple(zip(listings, counts.tolist(), strict=True)),
            days=days,
            minutes=minutes,
            key=np.repeat(np.array([p.key for p in of_run], dtype=np.uint64), counts),
            log_base=per_session("log_base"),
            daily_vol=per_session("daily_vol"),
            drift_per_day=per_session("drift_per_day"),
            minute_volume=per_session("minute_volume"),
            gap_vol=per_session("gap_vol"),
        )

    def __len__(self) -> int:
        return len(self.days)


@dataclass(frozen=True)
class DailyBars:
    """One bar per session (prices rounded to cents), and the unrounded log open and close the minutes join."""

    open: F64
    high: F64
    low: F64
    close: F64
    volume: I64
    log_open: F64
    log_close: F64


def daily_bars(sessions: Sessions) -> DailyBars:
    """The daily bar of every session: elementwise, so a session's bar is the same in any batch."""
    s, days = sessions, sessions.days
    anchor = _log_anchor(s, days)
    log_open = anchor + s.gap_vol * _hash_normal(s.key, _GAP, days)
    log_close = _next_day_anchor(s, anchor)
    # The bridge's extremes: log high = mid + sqrt(half^2 + variance * E / 2) for a standard exponential E.
    variance = s.daily_vol**2 * (s.minutes / _MIN_PER_DAY_REF)
    mid, half = (log_open + log_close) / 2.0, np.abs(log_close - log_open) / 2.0
    up = np.sqrt(half * half + variance * _hash_exponential(s.key, _HIGH, days) / 2.0)
    down = np.sqrt(half * half + variance * _hash_exponential(s.key, _LOW, days) / 2.0)
    open_, close = _cents(np.exp(log_open)), _cents(np.exp(log_close))
    # Rounding is monotone, so the maximum and minimum only guard the last bit.
    high = np.maximum(_cents(np.exp(mid + up)), np.maximum(open_, close))
    low = np.minimum(_cents(np.exp(mid - down)), np.minimum(open_, close))
    noise = np.exp(_DAY_VOLUME_SIGMA * _hash_normal(s.key, _VOLUME, days) - _DAY_VOLUME_SIGMA**2 / 2.0)
    # at least one share a minute, which the minute bars need
    volume = np.maximum(
        s.minutes, np.rint(s.minute_volume * s.minutes * _VOLUME_LEVEL * noise).astype(np.int64)
    )
    return DailyBars(open_, high, low, close, volume, log_open, log_close)


def _cents(prices: F64) -> F64:
    return np.asarray(np.round(prices, 2), dtype=np.float64)


def _next_day_anchor(s: Sessions, anchor: F64) -> F64:
    """``_log_anchor(s, s.days + 1)``, taken from the next session where it is the next day of the same symbol
    (Monday to Thursday, mostly): the anchor is a pure function of (symbol key, day), so the bits are the same."""
    follows = np.zeros(len(s), dtype=np.bool_)
    follows[:-1] = (s.days[1:] == s.days[:-1] + 1) & (s.key[1:] == s.key[:-1])
    out = np.empty_like(anchor)
    out[:-1] = anchor[1:]
    rest = np.flatnonzero(~follows)
    out[rest] = _log_anchor(s, s.days[rest] + 1, rest)
    return out


def _log_anchor(s: Sessions, days: I64, which: I64 | None = None) -> F64:
    """The log anchor price on ``days`` of each session's own symbol (of sessions ``which``, if given): drift
    plus value noise over four scales."""
    pick: slice | I64 = slice(None) if which is None else which
    key, daily_vol = s.key[pick], s.daily_vol[pick]
    t = (days - _DAY0).astype(np.float64)
    out = s.log_base[pick] + s.drift_per_day[pick] * t
    for spacing, octave in _OCTAVES:
        pos = t / spacing
        k = np.floor(pos).astype(np.int64)
        f = pos - k
        f = f * f * (3.0 - 2.0 * f)  # smoothstep: no kinks at the knots
        lo = _hash_normal(key, octave, k)
        hi = _hash_normal(key, octave, k + 1)
        # amplitude ~ sqrt(spacing) gives random-walk-like variance growth across scales
        out = out + 0.5 * daily_vol * np.sqrt(spacing) * (lo + (hi - lo) * f)
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class MinuteBars:
    """Every session's minute bars one after another (session ``i``'s are the ``sessions.minutes[i]`` after
    those of the sessions before it)."""

    open: F64
    high: F64
    low: F64
    close: F64
    volume: I64


def minute_bars(sessions: Sessions, daily: DailyBars) -> MinuteBars:
    """The minute bars of every session, aggregating exactly to ``daily``.

    Sessions are rows of a (sessions x longest session) grid: every step is elementwise, or a reduction or a
    running sum along one row, so a row's values do not depend on the other rows or on the grid's width, and a
    session comes out the same in any batch, alone included.
    """
    n = sessions.minutes
    rows, width = len(n), int(n.max(initial=0))
    row = np.arange(rows)
    live = np.arange(width) < n[:, None]
    z = _minute_draws(sessions, width)

    # The path: a random walk, pinned as a bridge from the open (before the first minute) to the close (at the
    # end of the last); ``frac`` runs 1/n .. 1 over a session, past 1 in the padding, which nothing reads.
    frac = np.arange(1, width + 1, dtype=np.float64) / n[:, None]
    walk = np.cumsum(z[0] * (sessions.daily_vol / np.sqrt(_MIN_PER_DAY_REF))[:, None], axis=1)
    last = n - 1
    a, b = daily.log_open[:, None], daily.log_close[:, None]
    close = np.exp(a + frac * (b - a) + walk - frac * walk[row, last][:, None])
    close[row, last] = np.exp(daily.log_close)
    open_ = np.empty_like(close)
    open_[:, 0] = np.exp(daily.log_open)
    open_[:, 1:] = close[:, :-1]
    wick = (0.6 * sessions.daily_vol / np.sqrt(_MIN_PER_DAY_REF))[:, None]
    # Past a session's end: a high of 0 and a low of the open, never its extremes (and finite, for the map).
    high = np.where(live, np.maximum(open_, close) * np.exp(wick * np.abs(z[1])), 0.0)
    low = np.where(live, np.minimum(open_, close) * np.exp(-wick * np.abs(z[2])), open_[:, :1])
    top, bottom = high.argmax(axis=1), low.argmin(axis=1)

    # The map: knots at the path's lowest low, its open and close (in price order) and its highest high, sent
    # to the daily low, open and close (in the same order: rounding is monotone) and high.
    first, final = open_[:, 0], close[row, last]
    xs = (low[row, bottom], np.minimum(first, final), np.maximum(first, final), high[row, top])
    ys = (daily.low, np.minimum(daily.open, daily.close), np.maximum(daily.open, daily.close), daily.high)
    close, high, low = (
        np.clip(_cents(_piecewise_linear(v, xs, ys)), daily.low[:, None], daily.high[:, None])
        for v in (close, high, low)
    )
    close[row, last] = daily.close
    open_[:, 0] = daily.open
    open_[:, 1:] = close[:, :-1]
    high[row, top] = daily.high
    low[row, bottom] = daily.low
    # A minute's high and low hold its open and close already (the map is monotone); these guard the last bit.
    high = np.maximum(high, np.maximum(open_, close))
    low = np.minimum(low, np.minimum(open_, close))

    volume = _minute_volumes(sessions, daily, z[3], live)
    return MinuteBars(open_[live], high[live], low[live], close[live], volume[live])


def _minute_draws(sessions: Sessions, width: int) -> F64:
    """Four standard normals per minute from each session's own ``PCG64(key of seed, symbol, date)``, as four
    (sessions x width) grids, zero past a session's end.

    Each session's generator starts from the state ``PCG64(key)`` would (``pcg64_states``, computed for all the
    sessions at once: seeding one by one cost more than the draws); the draws are all we loop for.
    """
    keys: list[int] = []
    first = 0
    for listing, count in sessions.runs:
        for day in sessions.days[first : first + count].tolist():
            keys.append(_key("session", listing.seed, listing.symbol, day))
        first += count
    bits = np.random.PCG64()
    rng = np.random.Generator(bits)
    z = np.zeros((4, len(keys), width))
    for i, (state, n) in enumerate(zip(pcg64_states(keys), sessions.minutes.tolist(), strict=True)):
        bits.state = state
        z[:, i, :n] = rng.standard_normal((4, n))
    return z


def _piecewise_linear(v: F64, xs: tuple[F64, ...], ys: tuple[F64, ...]) -> F64:
    """Each row of ``v`` through the monotone map joining its row's knots ``xs`` (ascending) to ``ys``."""
    out = np.empty_like(v)
    for i in range(len(xs) - 1):
        x0, x1, y0, y1 = xs[i][:, None], xs[i + 1][:, None], ys[i][:, None], ys[i + 1][:, None]
        width = x1 - x0
        slope = np.divide(y1 - y0, width, out=np.zeros_like(width), where=width > 0)
        piece = y0 + (v - x0) * slope
        if i == 0:
            out[...] = piece
        else:
            np.copyto(out, piece, where=v > x0)
    return out


def _minute_volumes(sessions: Sessions, daily: DailyBars, z: F64, live: npt.NDArray[np.bool_]) -> I64:
    """The daily volume shared out over the session's minutes in proportion to a U-shaped noisy profile, in
    integers (so the sum is exact): one share each, the rest by weight rounded down, what rounding left on the
    busiest minute."""
    n = sessions.minutes
    x = (np.arange(1, z.shape[1] + 1) - 0.5) / n[:, None]
    u_shape = 0.5 + 3.0 * (2.0 * x - 1.0) ** 2  # heavy at the open and the close, light at midday
    weight = np.maximum(1, np.rint(sessions.minute_volume[:, None] * u_shape * np.exp(0.35 * z)))
    weight = np.where(live, weight, 0).astype(np.int64)
    volume = 1 + (daily.volume - n)[:, None] * weight // weight.sum(axis=1)[:, None]
    volume = np.where(live, volume, 0)
    row = np.arange(len(n))
    volume[row, weight.argmax(axis=1)] += daily.volume - volume.sum(axis=1)
    return np.asarray(volume, dtype=np.int64)


__all__ = ["DailyBars", "MinuteBars", "Sessions", "daily_bars", "minute_bars", "minutes_per_session"]
