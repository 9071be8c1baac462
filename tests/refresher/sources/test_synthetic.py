"""The synthetic source: deterministic, well-formed, calendar-true bars; daily == aggregate(minute), exactly."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pytest

from refresher.calendar import EXCHANGES, get_calendar
from refresher.profile import Listing
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA
from refresher.segments import Segment, desired_segments
from refresher.sources import make_source, synthetic
from refresher.sources.synthetic import (
    Request,
    SyntheticSource,
    generate_daily,
    generate_many,
    generate_minutes,
)

from .conftest import MakeProfile

BODY = """\
universe: {symbols: [AAPL, MSFT, "7203", SAP, VOD], exchanges: {"7203": XTKS, SAP: XETR, VOD: XLON}}
start: 2024-10-01
end: 2024-12-13
timeframes: [1d, 1m]
seed: 11
"""
NOV = dt.date(2024, 11, 1)


def test_schema_and_determinism(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    assert isinstance(src, SyntheticSource)
    seg = Segment("AAPL", "1m", NOV)
    a, b = src.fetch(seg), make_source(make_profile(BODY)).fetch(seg)
    assert a.schema.equals(MINUTE_SCHEMA) and a.equals(b) and a.num_rows > 0
    assert src.fetch(Segment("AAPL", "1d", NOV)).schema.equals(DAILY_SCHEMA)
    other = src.fetch(Segment("MSFT", "1m", NOV))
    assert not np.array_equal(a.column("close").to_numpy(), other.column("close").to_numpy())


def test_months_are_independent_yet_prices_continue(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    nov = src.fetch(Segment("AAPL", "1d", NOV)).to_pandas()
    dec = src.fetch(Segment("AAPL", "1d", dt.date(2024, 12, 1))).to_pandas()
    gap = abs(dec["open"].iloc[0] / nov["close"].iloc[-1] - 1)
    assert gap < 0.05  # overnight gap, not a jump to an unrelated price


def test_ohlc_invariants(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    for tf in ("1m", "1d"):
        for sym in ("AAPL", "7203", "VOD"):
            df = src.fetch(Segment(sym, tf, NOV)).to_pandas()  # type: ignore[arg-type]
            assert (df["high"] >= df[["open", "close"]].max(axis=1)).all()
            assert (df["low"] <= df[["open", "close"]].min(axis=1)).all()
            assert (df["low"] > 0).all() and (df["volume"] > 0).all()
            when = df["ts" if tf == "1m" else "date"]
            assert when.is_monotonic_increasing and when.is_unique


def test_daily_is_exactly_the_aggregate_of_minutes() -> None:
    """Over 40 symbols on every exchange, two year ends with their half days and Tokyo's lunch breaks: first
    open, highest high, lowest low, last close and summed volume of each session's minutes are its daily bar,
    to the bit."""
    requests = [
        Request(Listing(f"S{i:02d}", exchange, "equity", i % 3), get_calendar(exchange), start, end)
        for i, exchange in enumerate(EXCHANGES * 8)
        for start, end in (
            (dt.date(2023, 11, 20), dt.date(2024, 1, 5)),
            (dt.date(2024, 11, 25), dt.date(2024, 12, 31)),
        )
    ]
    half_days = 0
    for request, minutes, daily in zip(
        requests, generate_many(requests, "1m"), generate_many(requests, "1d"), strict=True
    ):
        cal = request.cal
        day = minutes.column("ts").to_pandas().dt.tz_convert(cal.tz).dt.date.to_numpy()
        starts = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])
        ends = np.r_[starts[1:], len(day)] - 1
        col = {name: minutes.column(name).to_numpy() for name in ("open", "high", "low", "close", "volume")}
        assert daily.column("date").to_pylist() == day[starts].tolist()
        assert np.array_equal(daily.column("open").to_numpy(), col["open"][starts])
        assert np.array_equal(daily.column("high").to_numpy(), np.maximum.reduceat(col["high"], starts))
        assert np.array_equal(daily.column("low").to_numpy(), np.minimum.reduceat(col["low"], starts))
        assert np.array_equal(daily.column("close").to_numpy(), col["close"][ends])
        assert np.array_equal(daily.column("volume").to_numpy(), np.add.reduceat(col["volume"], starts))
        half_days += int((np.diff(np.r_[starts, len(day)]) < np.diff(np.r_[starts, len(day)]).max()).sum())
    assert half_days >= 8 * 6  # Black Friday, Christmas Eve, New Year's Eve... on several exchanges


def test_each_session_is_the_same_generated_alone() -> None:
    """A session's daily bar and minute bars do not depend on the range asked for: alone, or in a month."""
    listing, cal = Listing("AAPL", "XNYS", "equity", 3), get_calendar("XNYS")
    month_daily = generate_daily(listing, cal, dt.date(2024, 11, 1), dt.date(2024, 11, 30))
    month_minutes = generate_minutes(listing, cal, dt.date(2024, 11, 1), dt.date(2024, 11, 30))
    ny = month_minutes.column("ts").to_pandas().dt.tz_convert(cal.tz).dt.date.to_numpy()
    for day in (dt.date(2024, 11, 1), dt.date(2024, 11, 14), dt.date(2024, 11, 29)):  # the 29th closes early
        alone = generate_daily(listing, cal, day, day)
        index = month_daily.column("date").to_pylist().index(day)
        assert alone.equals(month_daily.slice(index, 1))
        rows = np.flatnonzero(ny == day)
        minutes = generate_minutes(listing, cal, day, day)
        assert minutes.equals(month_minutes.slice(int(rows[0]), len(rows)))


def test_daily_bars_never_compute_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_minutes(*args: object) -> None:
        raise AssertionError("daily bars asked for minutes")

    expected = generate_daily(
        Listing("AAPL", "XNYS", "equity", 1), get_calendar("XNYS"), NOV, dt.date(2024, 11, 30)
    )
    monkeypatch.setattr(synthetic, "minute_bars", no_minutes)
    monkeypatch.setattr(synthetic, "minutes_by_session", no_minutes)
    got = generate_daily(
        Listing("AAPL", "XNYS", "equity", 1), get_calendar("XNYS"), NOV, dt.date(2024, 11, 30)
    )
    assert got.equals(expected) and got.num_rows == 20
    with pytest.raises(AssertionError, match="asked for minutes"):
        generate_minutes(Listing("AAPL", "XNYS", "equity", 1), get_calendar("XNYS"), NOV, NOV)


def test_volume_is_u_shaped(make_profile: MakeProfile) -> None:
    df = make_source(make_profile(BODY)).fetch(Segment("MSFT", "1m", NOV)).to_pandas()
    minute_of_day = df.groupby(df["ts"].dt.date).cumcount()
    regular = df.groupby(df["ts"].dt.date)["ts"].transform("size") == 390
    prof = df[regular].groupby(minute_of_day[regular])["volume"].mean()
    first, middle, last = prof.iloc[:30].mean(), prof.iloc[180:210].mean(), prof.iloc[-30:].mean()
    assert first > 1.5 * middle and last > 1.5 * middle


def test_holidays_early_close_lunch(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    ny = src.fetch(Segment("AAPL", "1m", NOV)).to_pandas()
    ny_local = ny["ts"].dt.tz_convert("America/New_York")
    assert dt.date(2024, 11, 28) not in set(ny_local.dt.date)  # Thanksgiving
    black_friday = ny_local[ny_local.dt.date == dt.date(2024, 11, 29)]
    assert black_friday.max().time() == dt.time(12, 59) and len(black_friday) == 210
    daily = src.fetch(Segment("AAPL", "1d", NOV)).to_pandas()
    assert dt.date(2024, 11, 28) not in set(daily["date"]) and len(daily) == 20
    tk = src.fetch(Segment("7203", "1m", NOV)).to_pandas()["ts"].dt.tz_convert("Asia/Tokyo")
    times = set(tk.dt.time)
    assert dt.time(11, 29) in times and dt.time(12, 30) in times
    assert not any(dt.time(11, 30) <= t < dt.time(12, 30) for t in times)
    assert dt.date(2024, 11, 4) not in set(tk.dt.date)  # Culture Day observed


def test_partial_last_month_and_versions(make_profile: MakeProfile) -> None:
    profile = make_profile(BODY)
    src = make_source(profile)
    dec = src.fetch(Segment("AAPL", "1d", dt.date(2024, 12, 1))).to_pandas()
    assert dec["date"].max() == dt.date(2024, 12, 13)
    later = make_source(make_profile(BODY.replace("2024-12-13", "2024-12-20")))
    for seg in desired_segments(profile):
        same = src.version(seg) == later.version(seg)
        assert same == (seg.month != dt.date(2024, 12, 1)), seg


def test_changing_one_seed_changes_exactly_that_symbol(make_profile: MakeProfile) -> None:
    before = make_source(make_profile(BODY))
    after = make_source(make_profile(BODY + "seeds: {MSFT: 12}\n"))
    changed = {
        seg.symbol
        for seg in desired_segments(before.profile)  # type: ignore[attr-defined]
        if before.version(seg) != after.version(seg)
    }  # type: ignore[attr-defined]
    assert changed == {"MSFT"}
    seg = Segment("MSFT", "1d", NOV)
    assert not before.fetch(seg).equals(after.fetch(seg))
    assert before.fetch(Segment("AAPL", "1d", NOV)).equals(after.fetch(Segment("AAPL", "1d", NOV)))


def test_month_outside_range_is_empty(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    assert src.fetch(Segment("AAPL", "1m", dt.date(2023, 1, 1))).num_rows == 0


@pytest.mark.slow
def test_timing_ten_million_minute_bars() -> None:
    """Not an assert: prints how long 10 M minute bars take (benchmarks own speed)."""
    cal = get_calendar("XNYS")
    t0, rows = time.perf_counter(), 0
    for i in range(5):
        rows += generate_minutes(
            Listing(f"S{i}", "XNYS", "equity", 1), cal, dt.date(2004, 1, 1), dt.date(2024, 12, 31)
        ).num_rows
    print(f"\nsynthetic: {rows:,} minute bars in {time.perf_counter() - t0:.2f} s")
    assert rows > 10_000_000


@pytest.mark.parametrize(
    ("exchange", "month"),
    [
        ("XNYS", dt.date(2024, 3, 1)),  # New York's spring DST change (10th): opens move 14:30 -> 13:30 UTC
        ("XNYS", dt.date(2024, 11, 1)),  # autumn (3rd), and the day after Thanksgiving closes at 13:00
        ("XNYS", dt.date(2024, 7, 1)),  # July 3rd closes at 13:00, July 4th is a holiday
        ("XNYS", dt.date(2024, 12, 1)),  # Christmas Eve closes at 13:00
        ("XLON", dt.date(2024, 3, 1)),  # London changes on the 31st, three weeks after New York
        ("XLON", dt.date(2024, 12, 1)),  # half days on the 24th and 31st
        ("XETR", dt.date(2024, 10, 1)),
        ("XTKS", dt.date(2024, 11, 1)),  # the lunch break, and 15:30 closes from the 5th
    ],
)
def test_minute_bars_are_exactly_the_exchange_calendars_minutes(exchange: str, month: dt.date) -> None:
    """Every session's minute bars, in UTC, are exchange_calendars' own session minutes: the local session
    across DST changes, 210 bars on a 13:00 close, none on a holiday (checked against the library directly)."""
    import warnings

    import exchange_calendars as xc
    import pandas as pd

    end = (pd.Timestamp(month) + pd.offsets.MonthEnd(0)).date()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own pandas deprecations
        ref = xc.get_calendar(exchange, start="2024-01-02", end="2025-12-31", side="left")
        sessions = ref.sessions_in_range(month, end)
        expected = np.concatenate(
            [ref.session_minutes(s).tz_convert(None).to_numpy().astype("datetime64[ns]") for s in sessions]
        )
    listing = Listing("AAA", exchange, "equity", 1)
    minutes = generate_minutes(listing, get_calendar(exchange), month, end).column("ts").to_numpy()
    assert np.array_equal(minutes.astype("datetime64[ns]"), expected)
    daily = generate_daily(listing, get_calendar(exchange), month, end).column("date").to_pylist()
    assert daily == [s.date() for s in sessions]
