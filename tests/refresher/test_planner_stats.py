"""Planner statistics in every database a user receives: the working one, a reset, a pool clone, a test's clone;
and kept current for what a later refresh changed. On a real server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from refresher._planner_stats import stale_tables
from refresher.engines.base import ServerInfo
from refresher.pool import checkout_clone, drop_clone, pool_name, pool_status, refill_pool, wait_for_pool
from refresher.segments import Segment
from refresher.snapshot import pristine_name, restore_pristine, save_pristine
from tests.fixtures_postgres import daily_bars, minute_bars, refills_gone
from tests.refresher.conftest import load_now as _load
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = pytest.mark.postgres
JAN, FEB = dt.date(2024, 1, 1), dt.date(2024, 2, 1)


def _stats(dsn: str, table: str) -> set[str]:
    """The columns of ``table`` that ``pg_stats`` has statistics of."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_stats WHERE schemaname = 'public' AND tablename = %s", (table,)
        ).fetchall()
    return {name for (name,) in rows}


def _stale(dsn: str) -> list[tuple[str, bool]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return stale_tables(conn)


def test_a_new_partition_has_row_counts_but_no_statistics_until_the_refill(bars: ServerInfo) -> None:
    assert ("ohlcv_1min_2024_01", False) in _stale(bars.dsn())
    save_pristine(bars, pool_size=1, fill_pool=False)
    assert refill_pool(bars) == 1
    clone = pool_status(bars).ready[0]
    for dsn in (bars.dsn(), bars.dsn(clone)):
        assert _stale(dsn) == []
        assert {"symbol", "ts"} <= _stats(dsn, "ohlcv_1min_2024_01")
        assert {"symbol", "date"} <= _stats(dsn, "ohlcv_daily")
        assert _stats(dsn, "ohlcv_1min")  # the whole partitioned table's own
    with psycopg.connect(bars.dsn("postgres")) as conn:
        note = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (pristine_name(bars.dbname),),
        ).fetchone()
    assert note is not None and str(note[0]).endswith(" analyzed")


def test_a_reset_and_a_checkout_get_statistics_with_or_without_a_ready_clone(bars: ServerInfo) -> None:
    save_pristine(bars, pool_size=1)  # fills the pool itself: the copy is analyzed first
    assert _stale(bars.dsn(pool_status(bars).ready[0])) == []
    name = f"{bars.dbname}_t"
    try:
        assert _stale(checkout_clone(bars, name, refill=False)) == []  # took the ready clone
        assert _stale(checkout_clone(bars, f"{name}2", refill=False)) == []  # copied the pristine database
    finally:
        drop_clone(bars, name)
        drop_clone(bars, f"{name}2")
    with psycopg.connect(bars.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    assert restore_pristine(bars, refill=False).method == "template"
    assert _stale(bars.dsn()) == [] and "date" in _stats(bars.dsn(), "ohlcv_daily")


def test_appended_rows_and_a_new_month_are_analyzed_by_the_next_refill(bars: ServerInfo) -> None:
    save_pristine(bars, pool_size=1, fill_pool=False)
    refill_pool(bars)
    # A daily refresh's append to the month, and a new month (a partition of its own).
    _load(bars, Segment("AAPL", "1d", JAN), daily_bars("AAPL", JAN, 23))
    first = dt.datetime(2024, 2, 1, 14, 30, tzinfo=dt.UTC)
    _load(bars, Segment("AAPL", "1m", FEB), minute_bars("AAPL", first, 500))
    stale = {name for name, _ in _stale(bars.dsn())}
    assert {"ohlcv_daily", "ohlcv_1min_2024_02", "ohlcv_1min"} <= stale
    assert "ohlcv_1min_2024_01" not in stale  # unchanged: not analyzed again
    save_pristine(bars, pool_size=1, fill_pool=False)
    refill_pool(bars)
    wait_for_pool(bars)
    for dsn in (bars.dsn(), bars.dsn(pool_status(bars).ready[0])):
        assert _stale(dsn) == []
        assert _last_bound(dsn, "ohlcv_daily", "date") == "2024-01-23"
        assert "ts" in _stats(dsn, "ohlcv_1min_2024_02")


def test_a_failed_analysis_leaves_the_pristine_copy_and_the_refill_goes_on(
    bars: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refresher import pool
    from tests.refresher.test_snapshot_crash import _databases

    save_pristine(bars, pool_size=1, fill_pool=False)

    def fail(conn: psycopg.Connection[Any], also: object = ()) -> list[str]:
        conn.execute("SELECT 1/0")
        return []

    monkeypatch.setattr(pool, "analyze_stale", fail)
    assert refill_pool(bars) == 1
    db = bars.dbname  # the analysis's copy (in a private pool slot) is gone
    assert _databases(bars) == {db, pristine_name(db), pool_name(db, 0)}
    assert _stale(bars.dsn(pool_status(bars).ready[0]))  # cloned as it was, without statistics


def test_after_a_refresh_a_new_month_and_a_daily_append_every_database_has_current_statistics(
    checkout: Workspace,
) -> None:
    _every_database_current(checkout, "ohlcv_1min_2025_03")  # refreshed as of 2025-03-31
    checkout.refresh("--as-of", "2025-04-01")  # the next session: a new month, its own partition
    _every_database_current(checkout, "ohlcv_1min_2025_04")
    checkout.refresh("--as-of", "2025-04-02")  # a daily refresh: one session appended to the month
    _every_database_current(checkout, "ohlcv_1min_2025_04")
    checkout.run("reset", "--profile", checkout.profile)
    _every_database_current(checkout, "ohlcv_1min_2025_04")


def _every_database_current(ws: Workspace, month: str) -> None:
    """The working database and each pool clone (once the refill is done): no loaded table with stale
    statistics, and the last bar in the statistics of its ``month`` partition and of ``ohlcv_daily`` (every row
    is in the sample here)."""
    server = ws.server()
    wait_for_pool(server, timeout=120)
    # The working database's analysis runs beside the pool's fill, and may end after it (the pool may be empty).
    refills_gone(server.dbname)
    for dsn in [server.dsn(), *(server.dsn(name) for name in pool_status(server).ready)]:
        assert _stale(dsn) == [], dsn
        assert _last_bound(dsn, month, "ts") == _scalar(dsn, "SELECT max(ts)::text FROM ohlcv_1min")
        assert _last_bound(dsn, "ohlcv_daily", "date") == _scalar(
            dsn, "SELECT max(date)::text FROM ohlcv_daily"
        )


def _last_bound(dsn: str, table: str, column: str) -> str:
    """The greatest value of ``column`` in ``pg_stats`` (its histogram's last bound or a most common value): the
    greatest value ANALYZE sampled, as text."""
    kind = {"ts": "timestamptz", "date": "date"}[column]
    arrays = [
        f"unnest(coalesce({a}::text::{kind}[], '{{}}'))" for a in ("histogram_bounds", "most_common_vals")
    ]
    return str(
        _scalar(
            dsn,
            f"SELECT (SELECT max(v)::text FROM (SELECT {arrays[0]} UNION ALL SELECT {arrays[1]}) AS u(v)) "
            f"FROM pg_stats WHERE schemaname = 'public' AND tablename = '{table}' AND attname = '{column}'",
        )
    )


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_kill_9_after_any_statement_of_the_refills_analysis_leaves_a_snapshot_that_resets_and_heals(
    bars: ServerInfo,
) -> None:
    from tests.refresher.test_snapshot_crash import _databases, _killed_after, _state

    db, expected = bars.dbname, _state(bars.dsn())
    step, finished = 0, False
    while not finished:
        step += 1
        assert step < 40, "the refill never finished"
        save_pristine(bars, pool_size=1, fill_pool=False)  # a new copy, not analyzed yet
        finished = _killed_after(bars, step, "pool.refill_pool(server)")
        with psycopg.connect(bars.dsn(), autocommit=True) as conn:
            conn.execute("TRUNCATE ohlcv_daily, refresher_segments")
        restore_pristine(bars, refill=False)
        assert _state(bars.dsn()) == expected, f"step {step}"
        refill_pool(bars)
        assert _databases(bars) == {db, pristine_name(db), pool_name(db, 0)}, f"step {step}"
        assert _stale(bars.dsn(pool_name(db, 0))) == [], f"step {step}"
    assert step > 5  # the kill really landed between the steps of the analysis
