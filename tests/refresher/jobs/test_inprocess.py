"""The in-process executor's batching and what it keeps in memory: pure, no server."""

from __future__ import annotations

import datetime as dt

import pytest

from refresher.jobs import inprocess
from refresher.jobs.inprocess import store_batches
from refresher.jobs.segment import SegmentJob, SegmentOutcome, SegmentTotals
from refresher.segments import Segment, Timeframe
from tests.fixtures_postgres import daily_bars


def job(timeframe: Timeframe, month: int, symbol: str = "AAPL") -> SegmentJob:
    return SegmentJob(
        Segment(symbol, timeframe, dt.date(2024, month, 1)), f"k{symbol}{timeframe}{month}", "UTC"
    )


def test_store_batches_take_daily_segments_by_the_share_and_keep_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inprocess, "STORE_BATCH", 2)
    monkeypatch.setattr(inprocess, "DAILY_SHARE", 3)
    daily = [job("1d", m) for m in range(1, 13)]
    assert [len(b) for b in store_batches(daily)] == [6, 6]  # 2 minute segments' worth, 3 daily each
    minute = [job("1m", m) for m in range(1, 6)]
    assert [len(b) for b in store_batches(minute)] == [2, 2, 1]
    mixed = [daily[0], minute[0], daily[1], daily[2], minute[1]]  # weights 1, 3, 1, 1, 3 against 6
    batches = list(store_batches(mixed))
    assert [len(b) for b in batches] == [4, 1] and [j for b in batches for j in b] == mixed
    assert list(store_batches([])) == []


@pytest.mark.parametrize("keep", [True, False])
def test_totals_keep_fetched_daily_tables_only_for_a_features_step(keep: bool) -> None:
    segment = Segment("AAPL", "1d", dt.date(2024, 1, 1))
    table = daily_bars("AAPL", segment.month, 3)
    totals = SegmentTotals(keep_daily=keep)
    totals.add(SegmentOutcome(segment, "h", 3, fetched=True, loaded=True), table)
    assert (totals.done, totals.rows_loaded) == (1, 3)
    assert totals.daily_tables == ({segment: table} if keep else {})
