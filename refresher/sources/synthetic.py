"""Deterministic synthetic OHLCV: realistic-looking bars from (seed, symbol, session date) alone.

The market model lives in ``refresher.sources._synthetic_market``: a session's daily bar is drawn directly, and
its minute bars are derived from it, aggregating to it exactly. This module turns requests (a listing and a
date range) into Arrow tables, many at once: a batch of requests is one set of array operations over all their
sessions, cut into tables by slicing, and each table is exactly what generating its request alone gives.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from refresher.calendar import ExchangeCalendar, get_calendar, minutes_by_session
from refresher.errors import ProfileError, SourceError
from refresher.profile import Listing
from refresher.schema import SCHEMA_OF, empty_table
from refresher.segments import Segment, Timeframe
from refresher.sources._synthetic_market import Sessions, daily_bars, minute_bars, minutes_per_session
from refresher.sources.base import Source, calendar_library_version, effective_range

# Bump whenever the numbers this module produces change: it is part of every synthetic segment's version, hence
# of its store key, so a store holding another version's segments fetches them again rather than mixing them.
# 2: daily bars drawn directly, minute bars fitted to them (1 aggregated every minute of every session).
GENERATOR_VERSION = "2"
# Minutes generated per batch of minute segments: large enough that the numpy calls' fixed cost vanishes, small
# enough for the batch's grids (four draws and a dozen prices a minute) to stay near 100 MB.
BATCH_MINUTES = 256 * 1024
_MINUTES_PER_MONTH = 23 * 390  # an estimate per segment, to cut chunks without counting sessions first
# Sessions per batch of daily segments (about 2,800 months): a daily bar costs well under a microsecond, so a
# batch is one chunk of a store batch, and its arrays stay a few tens of MB.
BATCH_SESSIONS = 64 * 1024
_SESSIONS_PER_MONTH = 23
# Chunks generated at once (``_generate_chunks``).
GENERATION_THREADS = min(4, os.cpu_count() or 1)

I64 = npt.NDArray[np.int64]


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

    All the requests' sessions are computed at once (every step is elementwise, or works within one session),
    and the tables are slices of one: a batch costs per session (daily) or per minute (minute bars) rather
    than per call. Daily bars never compute a minute.
    """
    counts, days, lengths = _sessions_of(requests)
    live = np.flatnonzero(counts).tolist()
    if not live:
        return [empty_table(timeframe) for _ in requests]
    sessions = Sessions.of([requests[i].listing for i in live], counts[live], days, lengths)
    daily = daily_bars(sessions)
    if timeframe == "1d":
        rows = counts[live]
        when = pa.array(days.astype(np.int32), pa.date32())
        bars = (daily.open, daily.high, daily.low, daily.close, daily.volume)
    else:
        stamps = [minutes_by_session(requests[i].cal, requests[i].start, requests[i].end)[1] for i in live]
        rows = np.array([len(m) for m in stamps], dtype=np.int64)
        when = pa.array(np.concatenate(stamps) // 1000, pa.timestamp("us", tz="UTC"))
        minute = minute_bars(sessions, daily)
        bars = (minute.open, minute.high, minute.low, minute.close, minute.volume)
    table = _table(SCHEMA_OF[timeframe], [requests[i].listing.symbol for i in live], rows, when, bars)
    out = [empty_table(timeframe) if not n else None for n in counts.tolist()]
    for i, offset, n in zip(live, (np.cumsum(rows) - rows).tolist(), rows.tolist(), strict=True):
        out[i] = table.slice(offset, n)
    return out  # type: ignore[return-value]


def _sessions_of(requests: Sequence[Request]) -> tuple[I64, I64, I64]:
    """How many sessions each request has, then every session's date and minutes, the requests' one after
    another; found for all the requests of a calendar at once."""
    calendars = list(dict.fromkeys(r.cal for r in requests))
    first = np.zeros(len(requests), dtype=np.int64)
    counts = np.zeros(len(requests), dtype=np.int64)
    base = np.zeros(len(requests), dtype=np.int64)  # the calendar's offset in the concatenation below
    offset = 0
    for cal in calendars:
        members = [i for i, r in enumerate(requests) if r.cal is cal]
        lo, hi = cal.session_bounds([requests[i].start for i in members], [requests[i].end for i in members])
        first[members], counts[members], base[members] = lo, hi - lo, offset
        offset += len(cal.sessions)
    starts = np.cumsum(counts) - counts
    index = np.arange(int(counts.sum())) + np.repeat(first + base - starts, counts)
    days = np.concatenate([cal.sessions for cal in calendars])[index]
    lengths = np.concatenate([minutes_per_session(cal) for cal in calendars])[index]
    return counts, days, lengths


def _table(
    schema: pa.Schema, symbols: list[str], rows: I64, when: pa.Array, bars: Sequence[np.ndarray]
) -> pa.Table:
    """One table of the requests' rows, one after another: ``rows[i]`` of ``symbols[i]``."""
    indices = np.repeat(np.arange(len(symbols), dtype=np.int32), rows)
    symbol = pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(symbols)).cast(pa.string())
    return pa.Table.from_arrays([symbol, when, *(pa.array(col) for col in bars)], schema=schema)


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
            f"synthetic/g{GENERATOR_VERSION}/xc{calendar_library_version()}"
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
        # A batch's segments share a few listings and months: each looked up once (2,000 daily segments are
        # about 35 listings and 60 months; a lookup per segment was a tenth of the fetching thread's time).
        listings: dict[str, tuple[Listing, ExchangeCalendar]] = {}
        ranges: dict[dt.date, tuple[dt.date, dt.date] | None] = {}
        for i, segment in enumerate(segments):
            known = listings.get(segment.symbol)
            if known is None:
                listing = self._listing(segment)
                known = listings[segment.symbol] = (listing, get_calendar(listing.exchange))
            if segment.month in ranges:
                rng = ranges[segment.month]
            else:
                rng = ranges[segment.month] = effective_range(self.profile, segment)
            if rng is None:
                tables[i] = empty_table(segment.timeframe)
            else:
                todo[segment.timeframe].append((i, Request(*known, *rng)))
        # Chunks of about BATCH_MINUTES minutes or BATCH_SESSIONS sessions: their arrays stay tens of MB.
        per_chunk = {
            "1d": -(-BATCH_SESSIONS // _SESSIONS_PER_MONTH),
            "1m": -(-BATCH_MINUTES // _MINUTES_PER_MONTH),
        }
        chunks = [
            (timeframe, items[start : start + per_chunk[timeframe]])
            for timeframe, items in todo.items()
            for start in range(0, len(items), per_chunk[timeframe])
        ]
        made = _generate_chunks(
            [(timeframe, [request for _, request in items]) for timeframe, items in chunks]
        )
        for (_timeframe, items), chunk_tables in zip(chunks, made, strict=True):
            tables.update(zip([i for i, _ in items], chunk_tables, strict=True))
        return [tables[i] for i in range(len(segments))]


__all__ = [
    "GENERATOR_VERSION",
    "Request",
    "SyntheticSource",
    "generate_daily",
    "generate_many",
    "generate_minutes",
]
