"""Market calendars: status, breaks, early closes, and no synthetic bar outside a session."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from refresher.calendar import (
    EXCHANGES,
    get_calendar,
    last_completed_session,
    market_status,
    session_minutes,
    sessions_between,
)
from refresher.errors import CalendarError
from refresher.profile import Listing
from refresher.sources.synthetic import generate_minutes

NY, TOKYO = ZoneInfo("America/New_York"), ZoneInfo("Asia/Tokyo")


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
        [cached_file] = tmp_path.glob("XTKS-*.npz")
        calendar.get_calendar.cache_clear()
        cached = calendar.get_calendar("XTKS")
        assert cached is not built and cached.tz == built.tz == "Asia/Tokyo"
        for name in ("sessions", "opens", "closes", "break_starts", "break_ends"):
            assert np.array_equal(getattr(cached, name), getattr(built, name))
        # A torn file (a crash mid-write) is rebuilt, never trusted.
        cached_file.write_bytes(b"PK\x03\x04 torn")
        calendar.get_calendar.cache_clear()
        assert np.array_equal(calendar.get_calendar("XTKS").closes, built.closes)
    finally:
        calendar.use_cache_dir(None)
