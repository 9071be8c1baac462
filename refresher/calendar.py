"""Trading sessions of the exchanges we support: a thin, fast face over exchange_calendars.

Holidays, early closes, Tokyo's lunch break and time zones all come from exchange_calendars; nothing here
knows a holiday. We load each calendar once (lazily, 2000-01-01 .. today + 1 year) and keep its opens,
closes and break times as int64 nanosecond arrays, so a status query is a bisect or two instead of the
library's per-call pandas machinery (which costs ~100 us and warns under pandas 3). The status queries
(``market_status``, ``last_completed_session``, ``next_close``) read the compiled calendar as plain ints and
never import numpy or pandas once it is cached; the vectorised ones (sessions, minutes) use numpy.

Bars are left-labelled (see ``refresher.schema``): a session open at 09:30 and close at 16:00 has minute bars
09:30 .. 15:59; a lunch break [11:30, 12:30) has no bar stamped 11:30 .. 12:29.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import sys
import threading
import warnings
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refresher._installed import installed_version
from refresher._lazy import LazyModule
from refresher.errors import CalendarError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
else:
    # `market status`, `profiles` and a stamped no-op refresh ask only when sessions open and close: a bisect
    # over the cached arrays read as plain ints (``_session_times``), which must not pay numpy's import.
    np = LazyModule("numpy")

EXCHANGES: tuple[str, ...] = ("XNYS", "XNAS", "XTKS", "XLON", "XETR")
# Each exchange's time zone, as exchange_calendars names it (tests/refresher/test_calendar.py holds them equal):
# a no-op refresh needs the zones but not the sessions, and building a calendar costs 0.4-2 s.
EXCHANGE_TZ: dict[str, str] = {
    "XNYS": "America/New_York",
    "XNAS": "America/New_York",
    "XTKS": "Asia/Tokyo",
    "XLON": "Europe/London",
    "XETR": "Europe/Berlin",
}
CALENDAR_START = dt.date(2000, 1, 1)
_NS_PER_MIN = 60_000_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@dataclass(frozen=True, eq=False)
class ExchangeCalendar:
    """One exchange's sessions as parallel arrays (UTC nanoseconds); days without a break have break = close."""

    exchange: str
    tz: str
    first: dt.date
    last: dt.date
    sessions: I64  # session dates as days since 1970-01-01
    opens: I64
    closes: I64
    break_starts: I64
    break_ends: I64

    def session_slice(self, start: dt.date, end: dt.date) -> slice:
        """Index range of the sessions whose date lies in [start, end] (inclusive)."""
        self._check_range(start, end)
        lo = int(np.searchsorted(self.sessions, _days(start), side="left"))
        hi = int(np.searchsorted(self.sessions, _days(end), side="right"))
        return slice(lo, max(lo, hi))

    def session_bounds(self, starts: Sequence[dt.date], ends: Sequence[dt.date]) -> tuple[I64, I64]:
        """``session_slice`` of many ranges at once: each range's first session index and the one past its last."""
        for start, end in zip(starts, ends, strict=True):
            self._check_range(start, end)
        lo = np.searchsorted(self.sessions, [_days(d) for d in starts], side="left")
        hi = np.searchsorted(self.sessions, [_days(d) for d in ends], side="right")
        return lo.astype(np.int64), np.maximum(lo, hi).astype(np.int64)

    def _check_range(self, start: dt.date, end: dt.date) -> None:
        if start < self.first or end > self.last:
            raise CalendarError(
                f"{self.exchange}: range {start}..{end} is outside the loaded calendar {self.first}..{self.last}",
                exchange=self.exchange,
                value=f"{start}..{end}",
            )


@dataclass(frozen=True)
class MarketStatus:
    """Whether an exchange trades at an instant, and when that next changes.

    ``next_open``/``next_close`` are the next instants trading starts/stops after ``at``; a lunch break counts,
    so during Tokyo's morning session ``next_close`` is 11:30 local and during the break ``next_open`` is 12:30.
    """

    exchange: str
    at: dt.datetime
    is_open: bool
    session: dt.date | None
    next_open: dt.datetime
    next_close: dt.datetime
    on_break: bool
    tz: str

    def to_json(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "at": self.at.isoformat(),
            "is_open": self.is_open,
            "on_break": self.on_break,
            "session": self.session.isoformat() if self.session else None,
            "next_open": self.next_open.isoformat(),
            "next_close": self.next_close.isoformat(),
            "tz": self.tz,
        }


def _days(d: dt.date) -> int:
    return d.toordinal() - _EPOCH_ORDINAL


def _date(days: int) -> dt.date:
    return dt.date.fromordinal(int(days) + _EPOCH_ORDINAL)


def _utc(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=dt.UTC)


def _ns(at: dt.datetime) -> int:
    if at.tzinfo is None:  # naive instants are UTC by convention (documented in docs/profiles.md)
        at = at.replace(tzinfo=dt.UTC)
    delta = at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def exchange_tz(exchange: str) -> str:
    """The exchange's time zone name, without loading its calendar."""
    return EXCHANGE_TZ[check_exchange(exchange)]


def check_exchange(exchange: str) -> str:
    """The exchange code, or CalendarError naming the value and the choices."""
    if exchange not in EXCHANGES:
        raise CalendarError(
            f"exchange={exchange!r}: unknown exchange (choices: {', '.join(EXCHANGES)})",
            field="exchange",
            value=exchange,
        )
    return exchange


_ARRAYS = ("sessions", "opens", "closes", "break_starts", "break_ends")
# The cache file: this line, one JSON line (tz, length, array names), then the arrays as little-endian int64,
# one after the other. Read back as plain ints without numpy (``array``), or by numpy without a copy.
_CACHE_MAGIC = b"refresher-calendar 1"
_cache_dir: Path | None = None


@dataclass(frozen=True, eq=False)
class _SessionTimes:
    """One exchange's session times (UTC ns) as plain int sequences: what a status query bisects."""

    tz: str
    sessions: Sequence[int]
    opens: Sequence[int]
    closes: Sequence[int]
    break_starts: Sequence[int]
    break_ends: Sequence[int]


def use_cache_dir(path: Path | None) -> None:
    """Keep compiled calendars in ``path`` between processes (the CLI sets it from its settings; None: off).

    Building a calendar with exchange_calendars costs 0.2-0.4 s (pandas holiday rules); reading the arrays
    back costs about a millisecond, which is most of what a no-op ``refresher refresh`` would otherwise spend.
    """
    global _cache_dir
    _cache_dir = path
    get_calendar.cache_clear()
    _session_times.cache_clear()


def _cache_file(exchange: str, last: dt.date) -> Path | None:
    if _cache_dir is None:
        return None
    # The library's version is in the name: an upgrade may change holidays, so it must not reuse old arrays.
    return _cache_dir / f"{exchange}-xc{installed_version('exchange_calendars')}-{CALENDAR_START}-{last}.i64"


def _read_cached(path: Path) -> tuple[str, dict[str, array[int]]] | None:
    """(time zone, arrays) from a cache file; None when it is missing, torn by a crash, or not ours."""
    try:
        magic, header, body = path.read_bytes().split(b"\n", 2)
        meta = json.loads(header)
        tz, length = str(meta["tz"]), int(meta["length"])
        names = meta["arrays"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        magic != _CACHE_MAGIC
        or names != list(_ARRAYS)
        or length < 0
        or len(body) != 8 * length * len(_ARRAYS)
    ):
        return None
    values = array("q")
    values.frombytes(body)
    if sys.byteorder == "big":
        values.byteswap()
    return tz, {name: values[i * length : (i + 1) * length] for i, name in enumerate(_ARRAYS)}


def _write_cached(path: Path, cal: ExchangeCalendar) -> None:
    import tempfile  # here: with shutil, bz2 and lzma it is most of what `market status` would import

    header = {"tz": cal.tz, "length": len(cal.sessions), "arrays": list(_ARRAYS)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            handle.write(_CACHE_MAGIC + b"\n" + json.dumps(header).encode() + b"\n")
            for name in _ARRAYS:
                handle.write(np.asarray(getattr(cal, name), dtype="<i8").tobytes())
        os.replace(handle.name, path)  # atomic: a reader sees the old file, the new one, or none
    except OSError:
        return  # a read-only or full cache only costs speed
    _remove_older(path, cal.last)


def _remove_older(path: Path, last: dt.date) -> None:
    """Remove the cache files of ``path``'s exchange and library version that end before ``last``: the name
    carries a date a year from today, so each day writes a new one (280 KB per exchange, half a GB a year)."""
    prefix = path.name.removesuffix(f"{last}.i64")
    for old in path.parent.glob(f"{prefix}*.i64"):
        try:
            ended = dt.date.fromisoformat(old.name.removeprefix(prefix).removesuffix(".i64"))
        except ValueError:
            continue
        if ended < last:
            with contextlib.suppress(OSError):  # removed by another process meanwhile
                old.unlink()


def _calendar_last() -> dt.date:
    return dt.date.today() + dt.timedelta(days=366)


@functools.cache
def get_calendar(exchange: str) -> ExchangeCalendar:
    """The exchange's calendar from 2000-01-01 to a year from today, loaded once per process."""
    check_exchange(exchange)
    last = _calendar_last()
    path = _cache_file(exchange, last)
    cached = _read_cached(path) if path is not None else None
    if cached is not None:
        tz, arrays = cached
        columns = {name: np.frombuffer(values, dtype=np.int64) for name, values in arrays.items()}
        return ExchangeCalendar(exchange=exchange, tz=tz, first=CALENDAR_START, last=last, **columns)
    cal = _build_calendar(exchange, last)
    if path is not None:
        _write_cached(path, cal)
    return cal


def load_in_background(exchanges: Sequence[str]) -> threading.Thread:
    """Start loading the exchanges' calendars (``get_calendar``) on a thread of their own, and return it.

    For a caller about to wait on something else: a cold refresh waits a second or more for its server, while
    building a calendar costs 0.4-0.6 s of pandas (with its imports) that the first fetch would otherwise pay on
    the critical path. Join the thread before anything else asks ``get_calendar``: ``functools.cache`` does not
    stop a second thread from building the same calendar again. Errors are left to that later call.
    """

    def load() -> None:
        for exchange in dict.fromkeys(exchanges):
            with contextlib.suppress(Exception):
                get_calendar(exchange)

    thread = threading.Thread(target=load, name="refresher-calendars", daemon=True)
    thread.start()
    return thread


@functools.cache
def _session_times(exchange: str) -> _SessionTimes:
    """The exchange's session times from the cache file, without numpy; built (with it) when not cached."""
    check_exchange(exchange)
    path = _cache_file(exchange, _calendar_last())
    cached = _read_cached(path) if path is not None else None
    if cached is not None:
        tz, arrays = cached
        return _SessionTimes(tz=tz, **arrays)
    cal = get_calendar(exchange)
    return _SessionTimes(tz=cal.tz, **{name: getattr(cal, name).tolist() for name in _ARRAYS})


def _build_calendar(exchange: str, last: dt.date) -> ExchangeCalendar:
    import exchange_calendars as xc

    with warnings.catch_warnings():
        # exchange_calendars 4.x calls Series.values on tz-aware data, deprecated by pandas 3; harmless here
        # because we only read UTC instants. Scoped to this call so our own code stays warning-clean.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from pandas.errors import Pandas4Warning

            warnings.simplefilter("ignore", Pandas4Warning)
        except ImportError:  # pandas < 3
            pass
        cal = xc.get_calendar(exchange, start=CALENDAR_START.isoformat(), end=last.isoformat())
        sched = cal.schedule

    def utc_ns(col: str) -> I64:
        return np.asarray(sched[col].dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").astype(np.int64))

    closes = utc_ns("close")
    nat = np.iinfo(np.int64).min
    b_start, b_end = utc_ns("break_start"), utc_ns("break_end")
    no_break = (b_start == nat) | (b_end == nat)
    b_start = np.where(no_break, closes, b_start)
    b_end = np.where(no_break, closes, b_end)
    sessions = (sched.index.to_numpy(dtype="datetime64[D]").astype(np.int64)).astype(np.int64)
    return ExchangeCalendar(
        exchange=exchange,
        tz=str(cal.tz),
        first=CALENDAR_START,
        last=last,
        sessions=sessions,
        opens=utc_ns("open"),
        closes=closes,
        break_starts=b_start,
        break_ends=b_end,
    )


def market_status(exchange: str, at: dt.datetime | None = None) -> MarketStatus:
    """Is ``exchange`` trading at ``at`` (default: now)? Naive datetimes are taken as UTC."""
    cal = _session_times(check_exchange(exchange))
    at = dt.datetime.now(dt.UTC) if at is None else at
    t = _ns(at)
    i = bisect_right(cal.opens, t) - 1  # last session opened at or before t
    if i + 1 >= len(cal.opens) or i < 0:
        raise CalendarError(
            f"{exchange}: {at.isoformat()} is outside the loaded calendar {CALENDAR_START}..{_calendar_last()}",
            exchange=exchange,
            value=at.isoformat(),
        )
    in_session = t < int(cal.closes[i])
    on_break = in_session and int(cal.break_starts[i]) <= t < int(cal.break_ends[i])
    is_open = in_session and not on_break
    nxt = i + 1
    # the next instant trading stops / starts, counting a lunch break as a stop
    if is_open:
        next_close = cal.break_starts[i] if t < cal.break_starts[i] else cal.closes[i]
        next_open = cal.opens[nxt]
    elif on_break:
        next_open, next_close = cal.break_ends[i], cal.closes[i]
    else:
        next_open = cal.opens[nxt]
        next_close = cal.break_starts[nxt] if cal.break_starts[nxt] < cal.closes[nxt] else cal.closes[nxt]
    return MarketStatus(
        exchange=exchange,
        at=at if at.tzinfo else at.replace(tzinfo=dt.UTC),
        is_open=is_open,
        session=_date(int(cal.sessions[i])) if in_session else None,
        next_open=_utc(int(next_open)),
        next_close=_utc(int(next_close)),
        on_break=on_break,
        tz=cal.tz,
    )


def last_completed_session(exchange: str, at: dt.datetime | None = None) -> dt.date:
    """The latest session of ``exchange`` whose close is at or before ``at`` (default: now)."""
    cal = _session_times(check_exchange(exchange))
    t = _ns(dt.datetime.now(dt.UTC) if at is None else at)
    i = bisect_right(cal.closes, t) - 1
    if i < 0:
        raise CalendarError(f"{exchange}: no completed session before {at}", exchange=exchange, value=str(at))
    return _date(int(cal.sessions[i]))


def first_unclosed_session(exchange: str, at: dt.datetime | None = None) -> dt.date:
    """The first session of ``exchange`` whose close is after ``at`` (default: now): trading, or still to come."""
    cal, i = _first_close_after(exchange, at)
    return _date(int(cal.sessions[i]))


def next_close(exchange: str, at: dt.datetime) -> dt.datetime:
    """The first session close of ``exchange`` after ``at``: until then its last completed session stays."""
    cal, i = _first_close_after(exchange, at)
    return _utc(int(cal.closes[i]))


def _first_close_after(exchange: str, at: dt.datetime | None) -> tuple[_SessionTimes, int]:
    """``exchange``'s session times and the index of its first close after ``at`` (default: now); CalendarError
    when the loaded calendar ends before."""
    cal = _session_times(check_exchange(exchange))
    i = bisect_right(cal.closes, _ns(dt.datetime.now(dt.UTC) if at is None else at))
    if i >= len(cal.closes):
        raise CalendarError(
            f"{exchange}: no session close after {at} in the loaded calendar",
            exchange=exchange,
            value=str(at),
        )
    return cal, i


def sessions_between(exchange: str, start: dt.date, end: dt.date) -> list[dt.date]:
    """The session dates of ``exchange`` in [start, end], inclusive."""
    cal = get_calendar(check_exchange(exchange))
    return [_date(int(d)) for d in cal.sessions[cal.session_slice(start, end)]]


def days_since_epoch(day: dt.date) -> int:
    """The date as days since 1970-01-01: the unit of ``ExchangeCalendar.sessions`` and of Arrow's date32."""
    return _days(day)


def is_session_day(cal: ExchangeCalendar, days: I64) -> npt.NDArray[np.bool_]:
    """Which of ``days`` (days since 1970-01-01) are sessions of ``cal``; vectorised."""
    return np.isin(days, cal.sessions)


def is_trading_minute(cal: ExchangeCalendar, minutes: I64) -> npt.NDArray[np.bool_]:
    """Which of ``minutes`` (UTC ns, left-labelled bar starts) are whole trading minutes of ``cal``.

    A minute trades when it lies in a session's [open, close), outside its break, on a minute boundary.
    """
    if len(minutes) == 0:
        return np.zeros(0, np.bool_)
    # Search only the sessions the minutes span (a month's ~22, not 9,000): 5x faster on a segment.
    first = max(int(np.searchsorted(cal.opens, minutes.min(), side="right")) - 1, 0)
    last = int(np.searchsorted(cal.opens, minutes.max(), side="right"))
    opens = cal.opens[first:last] if last > first else cal.opens[first : first + 1]
    i = first + np.clip(np.searchsorted(opens, minutes, side="right") - 1, 0, len(opens) - 1)
    inside = (minutes >= cal.opens[i]) & (minutes < cal.closes[i])
    on_break = (minutes >= cal.break_starts[i]) & (minutes < cal.break_ends[i])
    return np.asarray(inside & ~on_break & (minutes % _NS_PER_MIN == 0), dtype=np.bool_)


def minutes_by_session(cal: ExchangeCalendar, start: dt.date, end: dt.date) -> tuple[slice, I64, I64]:
    """Every trading minute (UTC ns, left-labelled) of the sessions in [start, end].

    Returns the session index range, the minutes, and how many minutes each session has (so callers can
    split or ``reduceat`` per session). Fully vectorised: no Python loop over sessions or minutes.
    """
    sl = cal.session_slice(start, end)
    opens, closes = cal.opens[sl], cal.closes[sl]
    b_start, b_end = cal.break_starts[sl], cal.break_ends[sl]
    # two runs per session: [open, break_start) and [break_end, close); an absent break makes run 2 empty
    run_start = np.stack([opens, b_end], axis=1).ravel()
    run_len = (np.stack([b_start - opens, closes - b_end], axis=1).ravel() // _NS_PER_MIN).astype(np.int64)
    total = int(run_len.sum())
    if total == 0:
        return sl, np.empty(0, np.int64), np.zeros(len(opens), np.int64)
    run_offset = np.cumsum(run_len) - run_len
    within = np.arange(total, dtype=np.int64) - np.repeat(run_offset, run_len)
    minutes = np.repeat(run_start, run_len) + within * _NS_PER_MIN
    counts = run_len.reshape(-1, 2).sum(axis=1)
    return sl, minutes, counts


def session_minutes(exchange: str, start: dt.date, end: dt.date) -> npt.NDArray[np.datetime64]:
    """Every trading minute of the sessions in [start, end] as a ``datetime64[ns]`` array of UTC instants."""
    _, minutes, _ = minutes_by_session(get_calendar(check_exchange(exchange)), start, end)
    return minutes.view("datetime64[ns]")


__all__ = [
    "EXCHANGES",
    "EXCHANGE_TZ",
    "ExchangeCalendar",
    "MarketStatus",
    "check_exchange",
    "days_since_epoch",
    "exchange_tz",
    "get_calendar",
    "is_session_day",
    "is_trading_minute",
    "last_completed_session",
    "load_in_background",
    "market_status",
    "minutes_by_session",
    "next_close",
    "session_minutes",
    "sessions_between",
]
