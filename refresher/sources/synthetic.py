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
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import xxhash

from refresher.calendar import ExchangeCalendar, get_calendar, minutes_by_session
from refresher.errors import ProfileError, SourceError
from refresher.profile import Listing
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA, empty_table
from refresher.segments import Segment, Timeframe
from refresher.sources._pcg64_seeds import pcg64_states
from refresher.sources.base import Source, effective_range

# Bump whenever the numbers this module produces change: it is part of every synthetic segment's version.
GENERATOR_VERSION = "1"
# Minutes generated per batch of segments (a daily month is about 8,000 of them): large enough that the numpy
# calls' fixed cost vanishes, small enough for the batch's twenty-odd arrays to stay near 50 MB.
BATCH_MINUTES = 256 * 1024
_MINUTES_PER_MONTH = 23 * 390  # an estimate per segment, to cut chunks without counting sessions first
# Chunks generated at once (``_generate_chunks``).
GENERATION_THREADS = min(4, os.cpu_count() or 1)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
_NO_MINUTES: I64 = np.empty(0, np.int64)
_NS_PER_MIN = 60_000_000_000
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


def _hash_normal(key: U64, octave: int, knots: I64) -> F64:
    """A standard normal per knot, a pure function of (key, octave, knot); ``key`` holds one per knot."""
    with np.errstate(over="ignore"):
        base = key ^ np.uint64(octave << 56)
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


@dataclass(frozen=True)
class Request:
    """One segment's bars to generate: a listing and the sessions of ``cal`` in [start, end]."""

    listing: Listing
    cal: ExchangeCalendar
    start: dt.date
    end: dt.date


def generate_minutes(listing: Listing, cal: ExchangeCalendar, start: dt.date, end: dt.date) -> pa.Table:
    """Minute bars of ``listing`` for the sessions in [start, end] (MINUTE_SCHEMA)."""
    return generate_many([Request(listing, cal, start, end)], "1m")[0]


def generate_daily(listing: Listing, cal: ExchangeCalendar, start: dt.date, end: dt.date) -> pa.Table:
    """Daily bars of ``listing`` for the sessions in [start, end]: exact aggregates of the minute bars."""
    return generate_many([Request(listing, cal, start, end)], "1d")[0]


def generate_many(requests: Sequence[Request], timeframe: Timeframe) -> list[pa.Table]:
    """The bars of each request, in order: each table exactly what generating it alone gives.

    The minute paths of all the requests are computed at once (every step is elementwise, and the running sum
    restarts per request), so a batch of daily months costs per minute generated rather than per call:
    about 150 numpy calls per batch instead of per segment.
    """
    columns = _minute_columns(requests, with_minutes=timeframe == "1m")
    tables: list[pa.Table] = []
    for request, cols in zip(requests, columns, strict=True):
        if cols is None:
            tables.append(empty_table(timeframe))
        elif timeframe == "1m":
            ts, o, h, lo, c, v = cols.minutes, cols.open, cols.high, cols.low, cols.close, cols.volume
            when = pa.array(ts // 1000, pa.timestamp("us", tz="UTC"))
            tables.append(_table(MINUTE_SCHEMA, request.listing.symbol, when, o, h, lo, c, v))
        else:
            sl = request.cal.session_slice(request.start, request.end)
            dates = pa.array(request.cal.sessions[sl].astype(np.int32), pa.date32())
            d = cols.daily
            tables.append(_table(DAILY_SCHEMA, request.listing.symbol, dates, *d))
    return tables


def _table(schema: pa.Schema, symbol: str, when: pa.Array, *cols: npt.NDArray[np.generic]) -> pa.Table:
    n = len(when)
    symbols = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([symbol])).cast(
        pa.string()
    )
    arrays = [symbols, when, *(pa.array(col) for col in cols)]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class _Columns:
    """One request's minute bars (``minutes`` only when asked for) and their daily aggregates."""

    minutes: I64
    open: F64
    high: F64
    low: F64
    close: F64
    volume: I64
    daily: tuple[F64, F64, F64, F64, I64]


def _session_counts(cal: ExchangeCalendar, start: dt.date, end: dt.date) -> I64:
    """Trading minutes per session in [start, end], as ``minutes_by_session`` counts them."""
    sl = cal.session_slice(start, end)
    morning = (cal.break_starts[sl] - cal.opens[sl]) // _NS_PER_MIN
    afternoon = (cal.closes[sl] - cal.break_ends[sl]) // _NS_PER_MIN
    return np.asarray(morning + afternoon, dtype=np.int64)


def _session_days(request: Request) -> I64:
    return request.cal.sessions[request.cal.session_slice(request.start, request.end)]


def _minute_columns(requests: Sequence[Request], *, with_minutes: bool) -> list[_Columns | None]:
    """Every request's minute path, computed over all of them at once; None for a request without minutes.

    Values are those of generating each request alone, bit for bit: every step is elementwise or a reduction
    within one session, except the walk's running sum, which runs per request (a sum across requests would
    round differently), and per-symbol parameters enter as arrays holding the same doubles as the scalars.
    """
    minutes: list[I64] = []
    counts: list[I64] = []
    for r in requests:
        if with_minutes:
            _, mins, n = minutes_by_session(r.cal, r.start, r.end)
        else:
            mins, n = _NO_MINUTES, _session_counts(r.cal, r.start, r.end)
        minutes.append(mins)
        counts.append(n if int(n.sum()) else _NO_MINUTES)
    live = [i for i, n in enumerate(counts) if len(n)]
    out: list[_Columns | None] = [None] * len(requests)
    if not live:
        return out
    params: dict[Listing, _Params] = {}
    for i in live:
        if requests[i].listing not in params:
            params[requests[i].listing] = _Params(requests[i].listing)
    seg_counts = np.concatenate([counts[i] for i in live])  # minutes per session, all requests
    days = np.concatenate([_session_days(requests[i]) for i in live])
    sessions_of = np.array([len(counts[i]) for i in live], dtype=np.int64)
    per_session = {
        name: np.repeat(np.array([getattr(params[requests[i].listing], name) for i in live]), sessions_of)
        for name in ("log_base", "daily_vol", "drift_per_day", "minute_volume", "gap_vol")
    }
    keys = np.repeat(np.array([params[requests[i].listing].key for i in live], dtype=np.uint64), sessions_of)
    total = int(seg_counts.sum())

    # One PCG64 stream per session keeps any session reproducible on its own. Each session's generator is the
    # state PCG64(its key) starts from, computed for all sessions at once (``pcg64_states``): seeding one by one
    # cost more than the draws. The draws are all we loop for.
    session_keys: list[int] = []
    for i in live:
        listing = requests[i].listing
        first_day = len(session_keys)
        for day in days[first_day : first_day + len(counts[i])].tolist():
            session_keys.append(_key("session", listing.seed, listing.symbol, day))
    bits = np.random.PCG64()
    rng = np.random.Generator(bits)
    z = np.empty((4, total))
    gap = np.empty(len(days))
    offset = 0
    for session, (state, n) in enumerate(zip(pcg64_states(session_keys), seg_counts.tolist(), strict=True)):
        bits.state = state
        draws = rng.standard_normal(4 * n + 1)
        gap[session] = draws[0]
        z[:, offset : offset + n] = draws[1:].reshape(4, n)
        offset += n

    starts = np.cumsum(seg_counts) - seg_counts
    n_of = np.repeat(seg_counts, seg_counts).astype(np.float64)
    j = (np.arange(total) - np.repeat(starts, seg_counts) + 1).astype(np.float64)  # 1..n within the session
    frac = j / n_of
    sigma = np.repeat(per_session["daily_vol"] / np.sqrt(_MIN_PER_DAY_REF), seg_counts)
    steps = z[0] * sigma
    walk = np.empty(total)
    request_rows = np.add.reduceat(seg_counts, np.cumsum(sessions_of) - sessions_of)
    bounds = np.concatenate(([0], np.cumsum(request_rows)))
    for lo_row, hi_row in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        np.cumsum(steps[lo_row:hi_row], out=walk[lo_row:hi_row])
    first_session = np.zeros(len(days), dtype=np.bool_)
    first_session[np.cumsum(sessions_of) - sessions_of] = True
    before = np.where(first_session, 0.0, np.concatenate(([0.0], walk))[starts])  # walk before each session
    walk = walk - np.repeat(before, seg_counts)
    walk_end = np.repeat(walk[starts + seg_counts - 1], seg_counts)
    bridge = walk - frac * walk_end  # pinned to 0 at both ends of the session

    log_open = _log_anchor(per_session, keys, days) + per_session["gap_vol"] * gap
    log_target = _log_anchor(per_session, keys, days + 1)
    a, b = np.repeat(log_open, seg_counts), np.repeat(log_target, seg_counts)
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
    minute_volume = np.repeat(per_session["minute_volume"], seg_counts)
    volume = np.maximum(1, np.rint(minute_volume * u_shape * np.exp(0.35 * z[3]))).astype(np.int64)
    daily = (
        open_[starts],
        np.maximum.reduceat(high, starts),
        np.minimum.reduceat(low, starts),
        close[starts + seg_counts - 1],
        np.add.reduceat(volume, starts),
    )
    first = 0
    for index, lo_row, hi_row in zip(live, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        rows, n_sessions = slice(lo_row, hi_row), len(counts[index])
        sessions = slice(first, first + n_sessions)
        first += n_sessions
        out[index] = _Columns(
            minutes[index],
            open_[rows],
            high[rows],
            low[rows],
            close[rows],
            volume[rows],
            tuple(col[sessions] for col in daily),  # type: ignore[arg-type]
        )
    return out


def _log_anchor(per_session: dict[str, F64], keys: U64, days: I64) -> F64:
    """``_Params.log_anchor`` of each session's own symbol: the same operations on arrays of its parameters."""
    t = (days - _DAY0).astype(np.float64)
    out = per_session["log_base"] + per_session["drift_per_day"] * t
    for spacing, octave in _OCTAVES:
        pos = t / spacing
        k = np.floor(pos).astype(np.int64)
        f = pos - k
        f = f * f * (3.0 - 2.0 * f)  # smoothstep: no kinks at the knots
        lo = _hash_normal(keys, octave, k)
        hi = _hash_normal(keys, octave, k + 1)
        # amplitude ~ sqrt(spacing) gives random-walk-like variance growth across scales
        out = out + 0.5 * per_session["daily_vol"] * np.sqrt(spacing) * (lo + (hi - lo) * f)
    return np.asarray(out, dtype=np.float64)


def _generate_chunks(chunks: Sequence[tuple[Timeframe, list[Request]]]) -> list[list[pa.Table]]:
    """``generate_many`` of each chunk, in order, ``GENERATION_THREADS`` chunks at a time.

    Threads, not processes: the draws and the array arithmetic run in numpy with the GIL released, so two
    threads generated 1.4-1.5x as fast as one on this 2-core machine, with nothing to copy between processes.
    At most one chunk per thread is submitted ahead, so an error (or a Ctrl-C, whose exit waits for the
    running chunks) is never behind a queue of them.
    """
    if GENERATION_THREADS < 2 or len(chunks) < 2:
        return [generate_many(requests, timeframe) for timeframe, requests in chunks]
    made: list[list[pa.Table]] = []
    with ThreadPoolExecutor(GENERATION_THREADS, thread_name_prefix="refresher-generate") as pool:
        pending: deque[Future[list[pa.Table]]] = deque()
        for timeframe, requests in chunks:
            if len(pending) == GENERATION_THREADS:
                made.append(pending.popleft().result())
            pending.append(pool.submit(generate_many, requests, timeframe))
        made.extend(future.result() for future in pending)
    return made


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
        return self._listing_part(self._listing(segment)) + self._span(segment)

    def versions(self, segments: Sequence[Segment]) -> list[str]:
        # 60,000 segments share 1,000 listings and 60 months: each part once, then one concatenation each.
        heads: dict[str, str] = {}
        spans: dict[tuple[str, dt.date], str] = {}
        out: list[str] = []
        for segment in segments:
            head = heads.get(segment.symbol)
            if head is None:
                head = heads[segment.symbol] = self._listing_part(self._listing(segment))
            span = spans.get((segment.timeframe, segment.month))
            if span is None:
                span = spans[segment.timeframe, segment.month] = self._span(segment)
            out.append(head + span)
        return out

    @staticmethod
    def _listing_part(listing: Listing) -> str:
        # the calendar library's version decides holidays, hence which bars exist
        return (
            f"synthetic/g{GENERATOR_VERSION}/xc{_calendar_library_version()}"
            f"/seed{listing.seed}/{listing.exchange}/"
        )

    def _span(self, segment: Segment) -> str:
        rng = effective_range(self.profile, segment)
        return f"{rng[0]}..{rng[1]}" if rng else "empty"

    def fetch(self, segment: Segment) -> pa.Table:
        return self.fetch_many([segment])[0]

    def fetch_many(self, segments: Sequence[Segment]) -> list[pa.Table]:
        tables: dict[int, pa.Table] = {}
        todo: dict[Timeframe, list[tuple[int, Request]]] = {"1d": [], "1m": []}
        for i, segment in enumerate(segments):
            listing = self._listing(segment)
            rng = effective_range(self.profile, segment)
            if rng is None:
                tables[i] = empty_table(segment.timeframe)
            else:
                todo[segment.timeframe].append((i, Request(listing, get_calendar(listing.exchange), *rng)))
        # Chunks of about BATCH_MINUTES minutes: the batch's arrays stay a few tens of MB.
        per_chunk = -(-BATCH_MINUTES // _MINUTES_PER_MONTH)
        chunks = [
            (timeframe, items[start : start + per_chunk])
            for timeframe, items in todo.items()
            for start in range(0, len(items), per_chunk)
        ]
        made = _generate_chunks(
            [(timeframe, [request for _, request in items]) for timeframe, items in chunks]
        )
        for (_timeframe, items), chunk_tables in zip(chunks, made, strict=True):
            tables.update(zip([i for i, _ in items], chunk_tables, strict=True))
        return [tables[i] for i in range(len(segments))]


__all__ = ["GENERATOR_VERSION", "SyntheticSource", "generate_daily", "generate_minutes"]
