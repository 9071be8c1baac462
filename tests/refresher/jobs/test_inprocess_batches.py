"""How the in-process executor orders segment jobs and cuts them into load transactions (pure, no server)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pyarrow as pa
import pytest

from refresher.jobs.inprocess import LOAD_ROWS, MONTH_ROWS, _load_batches
from refresher.jobs.segment import SegmentJob, _month_major
from refresher.segments import Segment

MONTHS = [dt.date(2024, m, 1) for m in (1, 2, 3)]


def _produced(segments: list[Segment], rows: int) -> list[tuple[SegmentJob, pa.Table, str]]:
    table = pa.table({"x": pa.array([0] * rows)})
    return [(SegmentJob(s, f"k{s}", "America/New_York"), table, "h") for s in segments]


def test_minute_jobs_come_month_by_month_before_the_daily_ones() -> None:
    planned = [Segment(sym, tf, m) for sym in ("AAPL", "MSFT") for tf in ("1d", "1m") for m in MONTHS]
    ordered = _month_major(planned)
    assert [(s.month, s.symbol) for s in ordered[:6]] == [
        (m, sym) for m in MONTHS for sym in ("AAPL", "MSFT")
    ]
    assert ordered[6:] == [s for s in planned if s.timeframe == "1d"]


def test_a_months_minute_segments_share_one_transaction_and_months_do_not() -> None:
    symbols = [f"S{k:02d}" for k in range(30)]
    minutes = [Segment(sym, "1m", m) for m in MONTHS for sym in symbols]
    batches = list(_load_batches([_produced(minutes, 20_000)]))  # 600,000 rows a month: above LOAD_ROWS
    assert LOAD_ROWS < 30 * 20_000
    assert [{job.segment.month for job, _, _ in batch} for batch in batches] == [{m} for m in MONTHS]
    assert all(len(batch) == 30 for batch in batches)


def test_a_month_larger_than_month_rows_is_cut() -> None:
    minutes = [Segment(f"S{k:03d}", "1m", MONTHS[0]) for k in range(300)]
    batches = list(_load_batches([_produced(minutes, 10_000)]))
    assert len(batches) > 1 and all(sum(t.num_rows for _, t, _ in b) <= MONTH_ROWS for b in batches)


def test_daily_segments_still_batch_by_rows_across_months() -> None:
    daily = [Segment(f"S{k:03d}", "1d", m) for k in range(100) for m in MONTHS]
    batches = list(_load_batches([_produced(daily, 21)]))
    assert len(batches) == 1


def test_a_month_cut_by_the_fetchers_batches_is_still_one_transaction() -> None:
    symbols = [f"S{k:02d}" for k in range(30)]
    daily = _produced([Segment(sym, "1d", MONTHS[0]) for sym in symbols], 21)
    minutes = _produced([Segment(sym, "1m", m) for m in MONTHS for sym in symbols], 20_000)
    # store batches as the fetcher yields them: the daily segments, then a month and a half, then the rest
    chunks = [daily + minutes[:10], minutes[10:45], minutes[45:]]
    batches = list(_load_batches(chunks))
    assert [len(b) for b in batches] == [30, 30, 30, 30]
    assert [{job.segment.month for job, _, _ in b} for b in batches[1:]] == [{m} for m in MONTHS]


def test_what_came_before_a_failed_fetch_is_still_handed_to_the_loader() -> None:
    held = _produced([Segment(f"S{k:02d}", "1m", MONTHS[0]) for k in range(3)], 10)

    def chunks() -> Iterator[list[tuple[SegmentJob, pa.Table, str]]]:
        yield held
        raise RuntimeError("the source failed")

    batches = _load_batches(chunks())
    assert next(batches) == held  # the month is not complete, but nothing more will come
    with pytest.raises(RuntimeError, match="the source failed"):
        next(batches)


def test_a_complete_month_is_handed_over_without_waiting_for_the_next_chunk() -> None:
    symbols = [f"S{k:02d}" for k in range(30)]
    minutes = _produced([Segment(sym, "1m", m) for m in MONTHS for sym in symbols], 20_000)
    daily = _produced([Segment(sym, "1d", MONTHS[0]) for sym in symbols], 21)
    produced = minutes + daily
    # store batches as the fetcher yields them: two whole months, the third and half the daily, the rest
    chunks = [produced[:60], produced[60:105], produced[105:]]
    pulled: list[int] = []

    def fetched() -> Iterator[list[tuple[SegmentJob, pa.Table, str]]]:
        for k, chunk in enumerate(chunks):
            pulled.append(k)
            yield chunk

    batches = _load_batches(fetched(), [job for job, _, _ in produced])
    # both months of the first chunk go to the loaders before the fetcher's next batch is asked for
    assert [len(next(batches)), len(next(batches))] == [30, 30] and pulled == [0]
    assert [len(b) for b in batches] == [30, 30] and pulled == [0, 1, 2]


def test_a_month_split_between_fetched_and_stored_jobs_loads_in_parts_as_before() -> None:
    def minute(sym: str, k: int) -> Segment:
        return Segment(sym, "1m", MONTHS[k])

    # the source makes two segments of each month, the store holds the others: each month comes twice
    fetched = _produced([minute("S0", 0), minute("S1", 0), minute("S0", 1), minute("S1", 1)], 10)
    stored = _produced([minute("S2", 0), minute("S3", 0), minute("S2", 1), minute("S3", 1)], 10)
    produced = fetched + stored
    batches = list(_load_batches([fetched, stored], [job for job, _, _ in produced]))
    assert [b for batch in batches for b in batch] == produced
    assert [[job.segment for job, _, _ in b] for b in batches] == [
        [minute("S0", 0), minute("S1", 0)],
        [minute("S0", 1), minute("S1", 1)],
        [minute("S2", 0), minute("S3", 0)],
        [minute("S2", 1), minute("S3", 1)],
    ]
