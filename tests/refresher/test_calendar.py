"""Market calendars: status, breaks, early closes, and no synthetic bar outside a session."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

from refresher import calendar
from refresher.calendar import (
    CALENDAR_START,
    EXCHANGE_TZ,
    EXCHANGES,
    exchange_tz,
    get_calendar,
    last_completed_session,
    market_status,
    minutes_by_session,
    session_minutes,
    sessions_between,
)
from refresher.errors import CalendarError
from refresher.profile import Listing
from refresher.sources.synthetic import generate_minutes

NY, TOKYO = ZoneInfo("America/New_York"), ZoneInfo("Asia/Tokyo")
# The arrays of a compiled calendar, in the order the cache file holds them.
ARRAYS = ("sessions", "opens", "closes", "break_starts", "break_ends")


def test_open_session() -> None:
    s = market_status("XNYS", dt.datetime(2024, 11, 26, 10, 0, tzinfo=NY))
    assert s.is_open and not s.on_break
    assert s.session == dt.date(2024, 11, 26)
    assert s.next_close == dt.datetime(2024, 11, 26, 16, 0, tzinfo=NY)
    assert s.next_open == dt.datetime(2024, 11, 27, 9, 30, tzinfo=NY)
    assert s.tz == "America/New_York"


def test_closed_on_holiday_and_weekend() -> None:
    s = market_status("XNYS", dt.datetime(2024, 11, 28, 12, 0, tzinfo=NY))  # Thanksgiving
    assert not s.is_open and s.session is None
    assert s.next_open == dt.datetime(2024, 11, 29, 9, 30, tzinfo=NY)
    sat = market_status("XNAS", dt.datetime(2024, 11, 30, 12, 0, tzinfo=NY))
    assert not sat.is_open and sat.next_open == dt.datetime(2024, 12, 2, 9, 30, tzinfo=NY)


def test_early_close() -> None:
    before = market_status("XNYS", dt.datetime(2024, 11, 29, 12, 59, tzinfo=NY))
    after = market_status("XNYS", dt.datetime(2024, 11, 29, 13, 0, tzinfo=NY))
    assert before.is_open and before.next_close == dt.datetime(2024, 11, 29, 13, 0, tzinfo=NY)
    assert not after.is_open
    minutes = session_minutes("XNYS", dt.date(2024, 11, 29), dt.date(2024, 11, 29))
    assert len(minutes) == 210


def test_tokyo_lunch_break() -> None:
    s = market_status("XTKS", dt.datetime(2025, 3, 3, 12, 0, tzinfo=TOKYO))
    assert s.on_break and not s.is_open and s.session == dt.date(2025, 3, 3)
    assert s.next_open == dt.datetime(2025, 3, 3, 12, 30, tzinfo=TOKYO)
    morning = market_status("XTKS", dt.datetime(2025, 3, 3, 10, 0, tzinfo=TOKYO))
    assert morning.is_open and morning.next_close == dt.datetime(2025, 3, 3, 11, 30, tzinfo=TOKYO)


def test_tokyo_closes_1530_since_2024_11_05() -> None:
    old = session_minutes("XTKS", dt.date(2024, 11, 1), dt.date(2024, 11, 1))
    new = session_minutes("XTKS", dt.date(2024, 11, 5), dt.date(2024, 11, 5))

    def last(m: np.ndarray) -> dt.datetime:  # type: ignore[type-arg]
        stamp: dt.datetime = m[-1].astype("datetime64[s]").item()
        return stamp.replace(tzinfo=dt.UTC).astimezone(TOKYO)

    assert last(old).time() == dt.time(14, 59) and last(new).time() == dt.time(15, 29)
    assert (len(old), len(new)) == (300, 330)
    at_1520 = market_status("XTKS", dt.datetime(2024, 11, 5, 15, 20, tzinfo=TOKYO))
    assert at_1520.is_open and at_1520.next_close == dt.datetime(2024, 11, 5, 15, 30, tzinfo=TOKYO)


def test_status_json_round_trips() -> None:
    s = market_status("XLON", dt.datetime(2025, 1, 6, 9, 0, tzinfo=dt.UTC))
    data = json.loads(json.dumps(s.to_json()))
    assert data["exchange"] == "XLON" and data["is_open"] is True and data["session"] == "2025-01-06"


def test_unknown_exchange_names_value_and_choices() -> None:
    with pytest.raises(CalendarError) as info:
        get_calendar("XPAR")
    assert "XPAR" in str(info.value) and "XNYS" in str(info.value)


def test_out_of_range_is_a_calendar_error() -> None:
    with pytest.raises(CalendarError):
        sessions_between("XNYS", dt.date(1999, 1, 1), dt.date(1999, 2, 1))


def test_sessions_between_and_last_completed() -> None:
    days = sessions_between("XETR", dt.date(2024, 12, 23), dt.date(2025, 1, 3))
    assert dt.date(2024, 12, 25) not in days and dt.date(2024, 12, 23) in days
    assert last_completed_session("XNYS", dt.datetime(2024, 11, 29, 12, 0, tzinfo=NY)) == dt.date(
        2024, 11, 27
    )
    assert last_completed_session("XNYS", dt.datetime(2024, 11, 29, 13, 0, tzinfo=NY)) == dt.date(
        2024, 11, 29
    )


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_no_synthetic_bar_outside_sessions(exchange: str) -> None:
    """Every synthetic minute over 2024-2025 falls in a session, outside any break, and covers each minute."""
    cal = get_calendar(exchange)
    start, end = dt.date(2024, 1, 1), dt.date(2025, 12, 31)
    table = generate_minutes(Listing("TEST", exchange, "equity", 1), cal, start, end)
    t = table.column("ts").to_numpy().astype("datetime64[ns]").astype(np.int64)
    i = np.searchsorted(cal.opens, t, side="right") - 1
    assert (t >= cal.opens[i]).all() and (t < cal.closes[i]).all()
    assert not ((t >= cal.break_starts[i]) & (t < cal.break_ends[i])).any()
    sl = cal.session_slice(start, end)
    assert set(np.unique(i)) == set(range(sl.start, sl.stop))  # every session has bars, holidays none
    # and the exchange's own library agrees, on a sample, that each bar's minute is a trading minute
    import warnings

    import exchange_calendars as xc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = xc.get_calendar(exchange, start="2024-01-01", end="2025-12-31")
        sample = table.column("ts").to_pandas().iloc[:: max(1, table.num_rows // 200)]
        assert all(lib.is_trading_minute(ts) for ts in sample)


def test_compiled_calendars_are_cached_between_processes(tmp_path: Path) -> None:
    from refresher import calendar

    try:
        calendar.use_cache_dir(tmp_path)
        built = calendar.get_calendar("XTKS")
        [cached_file] = tmp_path.glob("XTKS-*.i64")
        calendar.get_calendar.cache_clear()
        cached = calendar.get_calendar("XTKS")
        assert cached is not built and cached.tz == built.tz == "Asia/Tokyo"
        for name in ("sessions", "opens", "closes", "break_starts", "break_ends"):
            assert np.array_equal(getattr(cached, name), getattr(built, name))
        # A torn file (a crash mid-write) is rebuilt, never trusted.
        cached_file.write_bytes(cached_file.read_bytes()[:-8])
        calendar.get_calendar.cache_clear()
        assert np.array_equal(calendar.get_calendar("XTKS").closes, built.closes)
    finally:
        calendar.use_cache_dir(None)


# --- The edges of the loaded calendar ------------------------------------------------------------------------

UTC = dt.UTC


def test_before_the_first_open_is_out_of_range() -> None:
    # XNYS's first session in the loaded range: Monday 2000-01-03, 09:30 EST = 14:30 UTC.
    first_open = dt.datetime(2000, 1, 3, 14, 30, tzinfo=UTC)
    with pytest.raises(CalendarError, match="outside the loaded calendar 2000-01-01") as info:
        market_status("XNYS", first_open - dt.timedelta(microseconds=1))
    assert info.value.fields == {"exchange": "XNYS", "value": "2000-01-03T14:29:59.999999+00:00"}
    assert market_status("XNYS", first_open).is_open


def test_after_the_last_loaded_open_is_out_of_range() -> None:
    cal = get_calendar("XNYS")
    last_open = dt.datetime.fromtimestamp(int(cal.opens[-1]) // 10**9, tz=UTC)
    with pytest.raises(CalendarError, match="outside the loaded calendar"):
        market_status("XNYS", last_open)  # the last session has no next open to report
    assert market_status("XNYS", last_open - dt.timedelta(days=7)).next_open <= last_open
    before_last = dt.datetime.fromtimestamp(int(cal.opens[-2]) // 10**9, tz=UTC)
    assert market_status("XNYS", before_last).next_open == last_open


def test_no_completed_session_before_the_first_close() -> None:
    first_close = dt.datetime(2000, 1, 3, 21, 0, tzinfo=UTC)
    with pytest.raises(CalendarError, match="XNYS: no completed session before 2000-01-03 20:59") as info:
        last_completed_session("XNYS", first_close - dt.timedelta(minutes=1))
    assert info.value.fields == {"exchange": "XNYS", "value": "2000-01-03 20:59:00+00:00"}
    assert last_completed_session("XNYS", first_close) == dt.date(2000, 1, 3)


def test_session_slice_guards_both_ends_inclusively() -> None:
    cal = get_calendar("XNYS")
    assert cal.first == CALENDAR_START == dt.date(2000, 1, 1)
    assert cal.last == dt.date.today() + dt.timedelta(days=366)
    assert sessions_between("XNYS", cal.first, dt.date(2000, 1, 4)) == [
        dt.date(2000, 1, 3),
        dt.date(2000, 1, 4),
    ]
    assert sessions_between("XNYS", cal.last, cal.last) in ([], [cal.last])
    with pytest.raises(CalendarError) as early:
        cal.session_slice(cal.first - dt.timedelta(days=1), dt.date(2000, 2, 1))
    assert early.value.fields == {"exchange": "XNYS", "value": "1999-12-31..2000-02-01"}
    with pytest.raises(
        CalendarError, match=rf"range 2000-01-01..{cal.last + dt.timedelta(days=1)} is outside"
    ):
        cal.session_slice(cal.first, cal.last + dt.timedelta(days=1))


def test_sessions_between_includes_both_ends_and_skips_closed_days() -> None:
    days = sessions_between("XNYS", dt.date(2024, 11, 25), dt.date(2024, 11, 29))
    assert days == [dt.date(2024, 11, d) for d in (25, 26, 27, 29)]  # Thanksgiving (28th) closed
    assert sessions_between("XNYS", dt.date(2024, 11, 30), dt.date(2024, 12, 1)) == []  # a weekend
    assert sessions_between("XNYS", dt.date(2024, 11, 29), dt.date(2024, 11, 25)) == []  # reversed: empty


# --- market_status at and around every boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "state", "next_open", "next_close"),
    [
        # Before the session: closed, and the next stop is the lunch break, not the close.
        ("03 08:00", "closed", "03 09:00", "03 11:30"),
        ("03 09:00", "open", "04 09:00", "03 11:30"),
        ("03 11:30", "break", "03 12:30", "03 15:30"),
        ("03 12:30", "open", "04 09:00", "03 15:30"),
        ("03 15:30", "closed", "04 09:00", "04 11:30"),
    ],
)
def test_tokyo_boundaries(local: str, state: str, next_open: str, next_close: str) -> None:
    def tokyo(day_time: str) -> dt.datetime:  # "DD HH:MM" in March 2025, Tokyo time
        return dt.datetime.fromisoformat(f"2025-03-{day_time}").replace(tzinfo=TOKYO)

    s = market_status("XTKS", tokyo(local))
    assert (s.is_open, s.on_break) == (state == "open", state == "break")
    assert (s.next_open, s.next_close) == (tokyo(next_open), tokyo(next_close))
    assert s.session == (None if state == "closed" else dt.date(2025, 3, 3))


def test_new_york_before_the_open_next_closes_at_the_close() -> None:
    s = market_status("XNYS", dt.datetime(2024, 11, 26, 8, 0, tzinfo=NY))
    assert not s.is_open and not s.on_break and s.session is None
    assert s.next_open == dt.datetime(2024, 11, 26, 9, 30, tzinfo=NY)
    assert s.next_close == dt.datetime(2024, 11, 26, 16, 0, tzinfo=NY)


def test_naive_datetimes_are_utc() -> None:
    naive = market_status("XNYS", dt.datetime(2024, 11, 26, 15, 0))
    aware = market_status("XNYS", dt.datetime(2024, 11, 26, 15, 0, tzinfo=UTC))
    assert naive == aware and naive.at.tzinfo is UTC and naive.is_open
    assert last_completed_session("XNYS", dt.datetime(2024, 11, 26, 21, 0)) == dt.date(2024, 11, 26)
    assert last_completed_session("XNYS", dt.datetime(2024, 11, 26, 20, 59)) == dt.date(2024, 11, 25)


def test_the_first_unclosed_session_follows_the_last_completed_one() -> None:
    # 12:00 UTC on Wednesday 2025-06-11: Tokyo's Wednesday closed at 06:30, New York's opens at 13:30.
    at = dt.datetime(2025, 6, 11, 12, 0, tzinfo=UTC)
    assert calendar.first_unclosed_session("XTKS", at) == dt.date(2025, 6, 12)
    assert calendar.first_unclosed_session("XNYS", at) == dt.date(2025, 6, 11)
    # a close itself ends the session: Friday's close, then Monday (the weekend has none)
    assert calendar.first_unclosed_session("XNYS", dt.datetime(2025, 6, 13, 20, 0, tzinfo=UTC)) == dt.date(
        2025, 6, 16
    )
    assert calendar.first_unclosed_session("XNYS") > last_completed_session("XNYS")


def test_default_instant_is_now() -> None:
    before = dt.datetime.now(UTC)
    s = market_status("XLON")
    assert before <= s.at <= dt.datetime.now(UTC) and s.at.tzinfo is not None
    assert s.next_open > before or s.is_open
    assert last_completed_session("XLON") <= before.date()
    assert last_completed_session("XLON") == last_completed_session("XLON", before)


def test_status_to_json_has_every_field() -> None:
    s = market_status("XTKS", dt.datetime(2025, 3, 3, 12, 0, tzinfo=TOKYO))
    assert s.to_json() == {
        "exchange": "XTKS",
        "at": "2025-03-03T12:00:00+09:00",
        "is_open": False,
        "on_break": True,
        "session": "2025-03-03",
        "next_open": "2025-03-03T03:30:00+00:00",
        "next_close": "2025-03-03T06:30:00+00:00",
        "tz": "Asia/Tokyo",
    }
    closed = market_status("XTKS", dt.datetime(2025, 3, 1, 12, 0, tzinfo=TOKYO)).to_json()
    assert closed["session"] is None and closed["is_open"] is False


def test_instants_convert_to_utc_nanoseconds_exactly() -> None:
    assert calendar._ns(dt.datetime(1970, 1, 2, 0, 0, 1, 5, tzinfo=UTC)) == 86_401_000_005_000
    assert calendar._ns(dt.datetime(1970, 1, 1, 9, 0, tzinfo=TOKYO)) == 0
    assert calendar._ns(dt.datetime(1969, 12, 31, 23, 59, 59, 999_999)) == -1_000
    assert calendar._utc(1_999_999_999) == dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_unknown_exchange_error_fields() -> None:
    with pytest.raises(CalendarError) as info:
        market_status("XPAR", dt.datetime(2025, 1, 6, tzinfo=UTC))
    assert str(info.value) == "exchange='XPAR': unknown exchange (choices: XNYS, XNAS, XTKS, XLON, XETR)"
    assert info.value.fields == {"field": "exchange", "value": "XPAR"}
    for call in (
        lambda: last_completed_session("xnys"),
        lambda: sessions_between("", dt.date(2024, 1, 1), dt.date(2024, 1, 2)),
    ):
        with pytest.raises(CalendarError, match="unknown exchange"):
            call()
    with pytest.raises(CalendarError, match="unknown exchange"):
        session_minutes("XPAR", dt.date(2024, 1, 2), dt.date(2024, 1, 2))


# --- Minutes of sessions ---------------------------------------------------------------------------------------


def test_minutes_by_session_counts_and_skips_the_break() -> None:
    cal = get_calendar("XTKS")
    sl, minutes, counts = minutes_by_session(cal, dt.date(2025, 2, 28), dt.date(2025, 3, 3))
    assert [calendar._date(d) for d in cal.sessions[sl]] == [dt.date(2025, 2, 28), dt.date(2025, 3, 3)]
    assert counts.tolist() == [330, 330] and len(minutes) == 660
    local = pd.DatetimeIndex(minutes.view("datetime64[ns]")).tz_localize("UTC").tz_convert(TOKYO)
    first_day = local[:330]
    assert first_day[0].time() == dt.time(9, 0) and first_day[-1].time() == dt.time(15, 29)
    assert first_day[149].time() == dt.time(11, 29) and first_day[150].time() == dt.time(12, 30)
    assert (np.diff(minutes[:150]) == 60 * 10**9).all()


def test_minutes_of_a_range_without_sessions_are_empty() -> None:
    sl, minutes, counts = minutes_by_session(
        get_calendar("XNYS"), dt.date(2024, 11, 30), dt.date(2024, 12, 1)
    )
    assert sl.stop == sl.start and len(minutes) == 0 and counts.shape == (0,)
    assert session_minutes("XNYS", dt.date(2024, 11, 30), dt.date(2024, 12, 1)).dtype == np.dtype(
        "datetime64[ns]"
    )


def toy_calendar(opens: list[int], closes: list[int]) -> calendar.ExchangeCalendar:
    """A UTC calendar of one session a day from 1970-01-01, without breaks, for shapes no exchange has."""
    return calendar.ExchangeCalendar(
        exchange="TEST",
        tz="UTC",
        first=dt.date(1970, 1, 1),
        last=dt.date(1970, 1, 10),
        sessions=np.arange(len(opens), dtype=np.int64),
        opens=np.array(opens, np.int64),
        closes=np.array(closes, np.int64),
        break_starts=np.array(closes, np.int64),
        break_ends=np.array(closes, np.int64),
    )


DAY, MINUTE = 86_400 * 10**9, 60 * 10**9


def test_zero_minute_sessions_have_no_bars() -> None:
    # Sessions whose open equals their close (a halted day): counted, each with zero minutes.
    cal = toy_calendar([0, DAY], [0, DAY])
    sl, minutes, counts = minutes_by_session(cal, dt.date(1970, 1, 1), dt.date(1970, 1, 2))
    assert (sl.start, sl.stop) == (0, 2)
    assert minutes.dtype == np.int64 and len(minutes) == 0
    assert counts.dtype == np.int64 and counts.tolist() == [0, 0]


def test_a_one_minute_session_has_its_minute() -> None:
    cal = toy_calendar([0, DAY], [MINUTE, DAY])  # one minute, then a halted day
    _, minutes, counts = minutes_by_session(cal, dt.date(1970, 1, 1), dt.date(1970, 1, 2))
    assert minutes.tolist() == [0] and counts.tolist() == [1, 0]


def test_session_minutes_are_utc_instants() -> None:
    minutes = session_minutes("XNYS", dt.date(2024, 11, 26), dt.date(2024, 11, 26))
    assert minutes.dtype == np.dtype("datetime64[ns]") and len(minutes) == 390
    assert minutes[0] == np.datetime64("2024-11-26T14:30")
    assert minutes[-1] == np.datetime64("2024-11-26T20:59")


# --- Building and caching the compiled calendars ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "tz"),
    [
        ("XNYS", "America/New_York"),
        ("XTKS", "Asia/Tokyo"),
        ("XLON", "Europe/London"),
        ("XETR", "Europe/Berlin"),
    ],
)
def test_built_calendar_matches_exchange_calendars(exchange: str, tz: str) -> None:
    import warnings

    import exchange_calendars as xc

    last = dt.date(2025, 12, 31)
    built = calendar._build_calendar(exchange, last)  # a fresh build, not the process-wide cache
    assert (built.exchange, built.tz, built.first, built.last) == (exchange, tz, CALENDAR_START, last)
    for name in ("sessions", "opens", "closes", "break_starts", "break_ends"):
        assert getattr(built, name).dtype == np.int64, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = xc.get_calendar(exchange, start="2000-01-01", end="2025-12-31").schedule
    assert len(built.sessions) == len(sched)
    assert calendar._date(int(built.sessions[0])) == sched.index[0].date()
    assert calendar._date(int(built.sessions[-1])) == sched.index[-1].date()
    for i in (0, len(sched) // 2, len(sched) - 1):
        assert int(built.opens[i]) == sched["open"].iloc[i].value
        assert int(built.closes[i]) == sched["close"].iloc[i].value
    has_break = built.break_starts < built.closes
    assert (built.break_ends[~has_break] == built.closes[~has_break]).all()
    assert has_break.any() == (exchange == "XTKS")
    if exchange == "XTKS":
        i = len(sched) - 1
        assert int(built.break_starts[i]) == sched["break_start"].iloc[i].value
        assert int(built.break_ends[i]) == sched["break_end"].iloc[i].value


def test_the_disk_cache_is_read(tmp_path: Path) -> None:
    try:
        cache = tmp_path / "state" / "calendars"
        calendar.use_cache_dir(cache)  # created, parents too, on first write
        built = calendar.get_calendar("XNYS")
        assert calendar.get_calendar("XNYS") is built  # once per process
        [cached_file] = cache.iterdir()
        magic, header, body = cached_file.read_bytes().split(b"\n", 2)  # plain arrays, nothing pickled
        meta = json.loads(header)
        assert meta == {"tz": "America/New_York", "length": len(built.sessions), "arrays": list(ARRAYS)}
        columns = np.frombuffer(body, dtype="<i8").reshape(len(ARRAYS), -1)
        assert np.array_equal(columns[ARRAYS.index("opens")], built.opens)
        today_plus = dt.date.today() + dt.timedelta(days=366)
        assert cached_file.name == f"XNYS-xc{version('exchange_calendars')}-2000-01-01-{today_plus}.i64"
        # Doctor the file: a calendar read back from it must carry the doctored values, through both readers.
        columns = columns.copy()
        columns[ARRAYS.index("closes")] += 1
        cached_file.write_bytes(
            b"\n".join([magic, json.dumps({**meta, "tz": "Doctored/Zone"}).encode(), columns.tobytes()])
        )
        calendar.use_cache_dir(cache)  # also forgets the in-process calendar
        read = calendar.get_calendar("XNYS")
        assert read.tz == "Doctored/Zone" and np.array_equal(read.closes, built.closes + 1)
        assert (read.exchange, read.first, read.last) == ("XNYS", CALENDAR_START, today_plus)
        at = dt.datetime(2025, 7, 3, 12, tzinfo=UTC)
        assert calendar.next_close("XNYS", at) == calendar._utc(
            int(built.closes[built.closes > calendar._ns(at)][0]) + 1
        )
        assert read.sessions.dtype == read.closes.dtype == np.int64
        assert np.array_equal(read.sessions, built.sessions)
    finally:
        calendar.use_cache_dir(None)


@pytest.mark.parametrize("content", ["empty", "not ours", "torn", "missing-array", "other magic"])
def test_an_unreadable_cache_file_is_rebuilt(tmp_path: Path, content: str) -> None:
    try:
        calendar.use_cache_dir(tmp_path)
        built = calendar.get_calendar("XLON")
        [cached_file] = tmp_path.glob("XLON-*.i64")
        good = cached_file.read_bytes()
        magic, header, body = good.split(b"\n", 2)
        meta = json.loads(header)
        cached_file.write_bytes(
            {
                "empty": b"",
                "not ours": b"PK\x03\x04 a zip, say",
                "torn": good[: len(good) // 2],  # a crash mid-write
                "missing-array": b"\n".join(
                    [
                        magic,
                        json.dumps({**meta, "arrays": list(ARRAYS[:-1])}).encode(),
                        body[: -len(body) // 5],
                    ]
                ),
                "other magic": b"\n".join([b"refresher-calendar 0", header, body]),
            }[content]
        )
        for reader in (calendar.get_calendar, calendar._session_times):
            calendar.use_cache_dir(tmp_path)
            rebuilt = reader("XLON")
            assert list(rebuilt.closes) == built.closes.tolist() and rebuilt.tz == "Europe/London"
        # and the rebuilt calendar replaced the bad file, leaving no temporary behind
        assert [p.name for p in tmp_path.iterdir()] == [cached_file.name]
        assert cached_file.read_bytes() == good
    finally:
        calendar.use_cache_dir(None)


def test_an_unwritable_cache_only_costs_speed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    try:
        calendar.use_cache_dir(blocker / "calendars")
        assert calendar.get_calendar("XETR").tz == "Europe/Berlin"
    finally:
        calendar.use_cache_dir(None)
    assert calendar.get_calendar("XETR").tz == "Europe/Berlin"


def test_is_session_day() -> None:
    cal = get_calendar("XNYS")
    days = np.array([calendar._days(dt.date(2024, 11, d)) for d in (27, 28, 29, 30)], np.int64)
    assert calendar.is_session_day(cal, days).tolist() == [True, False, True, False]  # Thanksgiving, Saturday


def test_is_trading_minute_at_every_edge() -> None:
    cal = get_calendar("XTKS")

    def ns(hour: int, minute: int, second: int = 0, day: int = 3) -> int:
        return calendar._ns(dt.datetime(2025, 3, day, hour, minute, second, tzinfo=TOKYO))

    cases = {
        ns(8, 59): False,  # before the open
        ns(9, 0): True,  # the open
        ns(9, 0, 30): False,  # not on a minute boundary
        ns(11, 29): True,
        ns(11, 30): False,  # the break starts
        ns(12, 29): False,
        ns(12, 30): True,  # the break ends
        ns(15, 29): True,
        ns(15, 30): False,  # the close is exclusive
        ns(10, 0, day=1): False,  # a Saturday
        calendar._ns(dt.datetime(1999, 6, 1, tzinfo=UTC)): False,  # before the loaded calendar
        int(cal.closes[-1]) + 10**12: False,  # after it
    }
    got = calendar.is_trading_minute(cal, np.array(list(cases), np.int64))
    assert got.dtype == np.bool_ and got.tolist() == list(cases.values())


def test_the_cache_is_written_next_to_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The temporary must be made in the cache's own directory: os.replace cannot move a file across
    # filesystems, so a temporary in the system temp dir would leave the cache silently unwritten.
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a system temp dir on another filesystem than tmp_path")
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    try:
        calendar.use_cache_dir(tmp_path)
        calendar.get_calendar("XNAS")
        assert [p.name for p in tmp_path.glob("XNAS-*.i64")]
    finally:
        calendar.use_cache_dir(None)


def test_now_is_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        before = dt.datetime.now(UTC)
        status = market_status("XNYS")
        assert before - dt.timedelta(seconds=5) <= status.at <= dt.datetime.now(UTC)
        # The session that last closed 9 hours ago (Tokyo's offset) must not count as just completed.
        assert last_completed_session("XNYS") == last_completed_session("XNYS", dt.datetime.now(UTC))
        probe = dt.datetime.now(UTC)
        assert market_status("XNYS").next_open == market_status("XNYS", probe).next_open
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_trading_minutes_in_the_first_and_last_loaded_sessions() -> None:
    cal = get_calendar("XNYS")
    edges = np.array([cal.opens[0], cal.opens[0] + 60 * 10**9, cal.opens[-1], cal.closes[-1] - 60 * 10**9])
    assert calendar.is_trading_minute(cal, edges.astype(np.int64)).tolist() == [True, True, True, True]


def test_the_static_time_zones_are_those_of_exchange_calendars() -> None:
    # A no-op refresh takes the zones from EXCHANGE_TZ instead of building calendars; they must agree.
    assert set(EXCHANGE_TZ) == set(EXCHANGES)
    for exchange in EXCHANGES:
        assert exchange_tz(exchange) == get_calendar(exchange).tz, exchange


def test_calendars_loaded_in_the_background_are_the_ones_get_calendar_returns() -> None:
    calendar.get_calendar.cache_clear()
    # Twice the same exchange is built once; an unknown one is left to the caller's own get_calendar to raise.
    calendar.load_in_background(["XLON", "XLON", "XPAR"]).join()
    before = calendar.get_calendar.cache_info()
    cal = calendar.get_calendar("XLON")
    assert calendar.get_calendar.cache_info().hits == before.hits + 1  # no second build
    assert cal.tz == "Europe/London" and len(cal.sessions) > 6000
    with pytest.raises(CalendarError, match="XPAR"):
        calendar.get_calendar("XPAR")


def test_a_new_days_cache_file_replaces_the_exchanges_older_ones(tmp_path: Path) -> None:
    """The cache's name carries its last date (today + a year), so each day wrote a new 280 KB file per exchange
    and none was ever removed: half a gigabyte a year. Writing one removes that exchange's earlier-dated files of
    the same exchange_calendars version, and nothing else."""
    xc = version("exchange_calendars")
    stale = [tmp_path / f"XNYS-xc{xc}-2000-01-01-{day}.i64" for day in ("2026-01-02", "2027-01-03")]
    kept = [
        tmp_path / f"XNAS-xc{xc}-2000-01-01-2026-01-02.i64",  # another exchange
        tmp_path / "XNYS-xc0.1-2000-01-01-2026-01-02.i64",  # another library version: another checkout's
        tmp_path / f"XNYS-xc{xc}-2000-01-01-2999-01-01.i64",  # a later one (a process whose clock is ahead)
        tmp_path / "notes.txt",
    ]
    for path in (*stale, *kept):
        path.write_bytes(b"x")
    try:
        calendar.use_cache_dir(tmp_path)
        calendar.get_calendar("XNYS")
    finally:
        calendar.use_cache_dir(None)
    today_plus = dt.date.today() + dt.timedelta(days=366)
    written = tmp_path / f"XNYS-xc{xc}-2000-01-01-{today_plus}.i64"
    assert sorted(tmp_path.iterdir()) == sorted([*kept, written])
