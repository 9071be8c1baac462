"""The synthetic source: deterministic, well-formed, calendar-true bars; daily == aggregate(minute)."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pandas as pd
import pytest

from refresher.calendar import get_calendar
from refresher.profile import Listing
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA
from refresher.segments import Segment, desired_segments
from refresher.sources import make_source
from refresher.sources.synthetic import SyntheticSource, generate_minutes

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


def test_daily_is_the_aggregate_of_minutes(make_profile: MakeProfile) -> None:
    src = make_source(make_profile(BODY))
    for sym in ("AAPL", "7203", "SAP"):
        cal = get_calendar(src.profile.listing(sym).exchange)  # type: ignore[attr-defined]
        minutes = src.fetch(Segment(sym, "1m", NOV)).to_pandas()
        minutes["date"] = minutes["ts"].dt.tz_convert(cal.tz).dt.date
        agg = minutes.groupby("date").agg(
            open=("open", "first"),
            high=("high", "max"),
            low=("low", "min"),
            close=("close", "last"),
            volume=("volume", "sum"),
        )
        daily = src.fetch(Segment(sym, "1d", NOV)).to_pandas().set_index("date")
        pd.testing.assert_frame_equal(daily.drop(columns="symbol"), agg, check_names=False)


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
