"""desired_segments: every (symbol, timeframe, month) of a profile, sorted, and only those."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refresher.profile import load_profile
from refresher.segments import TABLE_OF, TIMEFRAMES, Segment, desired_segments
from refresher.settings import BUILTIN_PROFILES


def test_desired_segments_cover_symbols_timeframes_months() -> None:
    p = load_profile("ui_testing", [BUILTIN_PROFILES], as_of=dt.date(2025, 3, 14))
    segs = desired_segments(p)
    assert len(segs) == 20 * 2 * 3
    assert segs == sorted(segs) and len(set(segs)) == len(segs)
    assert {s.month for s in segs} == {dt.date(2025, 1, 1), dt.date(2025, 2, 1), dt.date(2025, 3, 1)}
    assert {s.timeframe for s in segs} == {"1d", "1m"}
    assert segs[0] == Segment("AAPL", "1d", dt.date(2025, 1, 1))


def test_months_without_sessions_are_still_desired(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text("universe: {symbols: [AAPL]}\nstart: 2024-12-28\nend: 2025-01-01\ntimeframes: [1d]\n")
    p = load_profile(str(path), [])
    # 2025-01-01 is a holiday: January has no session in range, yet the month is desired (recorded empty)
    assert desired_segments(p) == [
        Segment("AAPL", "1d", dt.date(2024, 12, 1)),
        Segment("AAPL", "1d", dt.date(2025, 1, 1)),
    ]


def test_segment_month_must_be_the_first_day() -> None:
    with pytest.raises(ValueError, match=r"first of a month, got 2025-01-02"):
        Segment("AAPL", "1d", dt.date(2025, 1, 2))
    assert Segment("AAPL", "1d", dt.date(2025, 1, 1)).month == dt.date(2025, 1, 1)


def test_segment_timeframe_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"unknown timeframe '5m'"):
        Segment("AAPL", "5m", dt.date(2025, 1, 1))  # type: ignore[arg-type]


def test_segment_label_table_and_text() -> None:
    daily = Segment("AAPL", "1d", dt.date(2025, 3, 1))
    minute = Segment("AAPL", "1m", dt.date(2025, 3, 1))
    assert daily.month_label == "2025-03"
    assert (daily.table, minute.table) == ("ohlcv_daily", "ohlcv_1min")
    assert TABLE_OF == {"1d": "ohlcv_daily", "1m": "ohlcv_1min"} and set(TABLE_OF) == set(TIMEFRAMES)
    assert str(minute) == "AAPL/1m/2025-03"


@pytest.mark.parametrize(
    ("month", "following"),
    [
        (dt.date(2025, 1, 1), dt.date(2025, 2, 1)),
        (dt.date(2024, 11, 1), dt.date(2024, 12, 1)),
        (dt.date(2024, 12, 1), dt.date(2025, 1, 1)),  # the year rolls over
    ],
)
def test_month_bounds_are_half_open(month: dt.date, following: dt.date) -> None:
    assert Segment("X", "1d", month).month_bounds() == (month, following)


@given(st.dates(dt.date(1990, 1, 1), dt.date(2100, 12, 1)))
def test_month_bounds_cover_exactly_the_month(day: dt.date) -> None:
    first, nxt = Segment("X", "1d", day.replace(day=1)).month_bounds()
    assert first <= day < nxt
    assert nxt.day == 1 and (nxt - dt.timedelta(days=1)).month == first.month


def test_segments_sort_by_symbol_then_timeframe_then_month() -> None:
    segs = [
        Segment("B", "1d", dt.date(2025, 1, 1)),
        Segment("A", "1m", dt.date(2025, 1, 1)),
        Segment("A", "1d", dt.date(2025, 2, 1)),
        Segment("A", "1d", dt.date(2025, 1, 1)),
    ]
    assert sorted(segs) == [segs[3], segs[2], segs[1], segs[0]]
