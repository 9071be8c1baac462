"""Month partitions of ohlcv_1min: made and filled with COPY FREEZE by a month's first load, on a real server."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from refresher.database import count_rows, ensure_schema, read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.load import SEGMENT_LOCK_WAIT, SegmentLoad, delete_segment, load_segment, load_segments
from refresher.partitions import _by_month, existing_months, is_partitioned
from refresher.segments import Segment
from tests.child_processes import reap
from tests.fixtures_postgres import minute_bars

pytestmark = pytest.mark.postgres
NY = "America/New_York"
JAN = dt.date(2024, 1, 1)
FEB = dt.date(2024, 2, 1)
OPEN_JAN_2 = dt.datetime(2024, 1, 2, 14, 30, tzinfo=dt.UTC)
OPEN_FEB_1 = dt.datetime(2024, 2, 1, 14, 30, tzinfo=dt.UTC)


@pytest.fixture
def conn(pg_database: ServerInfo) -> Any:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        yield conn


def _month_load(symbols: list[str], month: dt.date, first: dt.datetime, n: int = 2_000) -> list[SegmentLoad]:
    return [
        SegmentLoad(Segment(symbol, "1m", month), minute_bars(symbol, first, n, seed=k), f"h{k}", NY)
        for k, symbol in enumerate(symbols)
    ]


def _wal_bytes(conn: psycopg.Connection[Any], load: Any) -> int:
    before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    load()
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (before,)).fetchone()
    return int(row[0])


def test_a_new_database_partitions_minutes_by_month(conn: psycopg.Connection[Any]) -> None:
    assert is_partitioned(conn, "ohlcv_1min")
    assert not is_partitioned(conn, "ohlcv_daily")
    load_segments(conn, _month_load(["AAPL", "MSFT"], JAN, OPEN_JAN_2))
    assert existing_months(conn, "ohlcv_1min") == {JAN}
    rows = conn.execute("SELECT tableoid::regclass::text, count(*) FROM ohlcv_1min GROUP BY 1").fetchall()
    assert rows == [("ohlcv_1min_2024_01", 4_000)]


def test_a_new_months_rows_are_frozen_and_write_next_to_no_wal(conn: psycopg.Connection[Any]) -> None:
    """The point of partitions: the month's first load writes its rows without WAL, a later one with it."""
    # Above wal_skip_threshold (2 MB): a smaller new relation is written to the WAL at commit instead.
    symbols = [f"S{k:02d}" for k in range(5)]
    first = _wal_bytes(conn, lambda: load_segments(conn, _month_load(symbols, JAN, OPEN_JAN_2, 20_000)))
    again = _wal_bytes(conn, lambda: load_segments(conn, _month_load(symbols, FEB, OPEN_FEB_1, 20_000)))
    size = conn.execute("SELECT pg_relation_size('ohlcv_1min_2024_01')").fetchone()[0]
    assert size > 5_000_000
    assert first < size / 10  # catalog and ledger records only; no heap or index pages
    # the same month again (its partition exists): rows and index through the WAL, as before partitions
    reload = _wal_bytes(conn, lambda: load_segments(conn, _month_load(symbols, JAN, OPEN_JAN_2, 20_000)))
    assert reload > size / 2
    assert again < size / 10  # February's partition was new: no WAL for its rows either
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_visibility")  # shipped with the embedded server
    pages = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE all_frozen) FROM pg_visibility_map('ohlcv_1min_2024_02')"
    ).fetchone()
    # no reader will rewrite them to set hint bits (COPY leaves a page a batch ended on unmarked, ~2%)
    assert pages[0] > 0 and pages[1] > 0.9 * pages[0]


def test_a_new_months_key_is_built_without_parallel_workers(conn: psycopg.Connection[Any]) -> None:
    """The loaders fill months side by side; a parallel key build would only add its workers' own sorts."""
    sorts: list[str] = []
    conn.add_notice_handler(lambda notice: sorts.append(notice.message_primary or ""))
    conn.execute("SET max_parallel_maintenance_workers = 4")  # even where the session allows them
    conn.execute("SET trace_sort = on")  # each sort says how it ran, parallel or not
    conn.execute("SET client_min_messages = log")
    # About 13 MB of heap: past min_parallel_table_scan_size (8 MB), where the server would use a worker
    load_segments(conn, _month_load([f"S{k:02d}" for k in range(5)], JAN, OPEN_JAN_2, 30_000))
    conn.execute("RESET client_min_messages")
    assert conn.execute("SELECT pg_relation_size('ohlcv_1min_2024_01')").fetchone()[0] > 8 * 2**20
    assert any("internal sort" in message for message in sorts)
    assert not [message for message in sorts if "parallel" in message]


def test_the_months_of_a_batch_are_found_whichever_chunk_holds_its_extremes() -> None:
    late_jan = minute_bars("MSFT", dt.datetime(2024, 1, 31, 23, 58, tzinfo=dt.UTC), 4).column("ts")
    feb = minute_bars("AAPL", OPEN_FEB_1, 3).column("ts")
    jan, february = 2024 * 12, 2024 * 12 + 1
    assert _by_month(pa.chunked_array([*feb.chunks, *feb.chunks])) == {february: None}
    # The earliest instant in the last chunk, the latest in the first: each row's month, in order.
    months = _by_month(pa.chunked_array([*feb.chunks, *late_jan.chunks]))
    assert list(months) == [jan, february]
    in_jan, in_feb = months[jan], months[february]
    assert in_jan is not None and in_jan.tolist() == [False] * 3 + [True, True, False, False]
    assert in_feb is not None and in_feb.tolist() == [True] * 3 + [False, False, True, True]


def test_segments_reload_and_delete_across_partitions(conn: psycopg.Connection[Any]) -> None:
    # A New York January segment's last evening is February in UTC: its rows span two partitions.
    late_jan = dt.datetime(2024, 1, 31, 23, 0, tzinfo=dt.UTC)
    jan, feb = Segment("AAPL", "1m", JAN), Segment("AAPL", "1m", FEB)
    load_segment(conn, jan, minute_bars("AAPL", late_jan, 240), "h1", tz=NY)
    assert existing_months(conn, "ohlcv_1min") == {JAN, FEB}
    load_segment(conn, feb, minute_bars("AAPL", OPEN_FEB_1, 100), "h2", tz=NY)
    load_segment(conn, jan, minute_bars("AAPL", OPEN_JAN_2, 390), "h3", tz=NY)  # reload: replaces both parts
    assert count_rows(conn, [jan, feb], timezones=NY, wait=SEGMENT_LOCK_WAIT) == {jan: 390, feb: 100}
    assert delete_segment(conn, jan, tz=NY) == 390
    assert count_rows(conn, [jan, feb], timezones=NY, wait=SEGMENT_LOCK_WAIT) == {jan: 0, feb: 100}


def test_a_row_inserted_by_hand_goes_to_the_default_partition_and_its_month_still_loads(
    conn: psycopg.Connection[Any],
) -> None:
    conn.execute("INSERT INTO ohlcv_1min VALUES ('ZZZ', '2024-01-15 15:00+00', 1, 1, 1, 1, 1)")
    assert conn.execute("SELECT tableoid::regclass::text FROM ohlcv_1min").fetchone() == (
        "ohlcv_1min_default",
    )
    load_segments(conn, _month_load(["AAPL"], JAN, OPEN_JAN_2))
    assert existing_months(conn, "ohlcv_1min") == set()  # January routes to the default partition now
    assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == (2_001,)
    load_segments(conn, _month_load(["AAPL"], FEB, OPEN_FEB_1))  # a month the default does not hold
    assert existing_months(conn, "ohlcv_1min") == {FEB}


def test_a_database_made_before_partitions_keeps_its_plain_table(pg_database: ServerInfo) -> None:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE ohlcv_1min (symbol text NOT NULL, ts timestamptz NOT NULL, open float8 NOT NULL, "
            "high float8 NOT NULL, low float8 NOT NULL, close float8 NOT NULL, volume int8 NOT NULL, "
            "CONSTRAINT ohlcv_1min_pkey PRIMARY KEY (symbol, ts))"
        )
        ensure_schema(conn)
        ensure_schema(conn)
        assert not is_partitioned(conn, "ohlcv_1min")
        load_segments(conn, _month_load(["AAPL", "MSFT"], JAN, OPEN_JAN_2))
        segment = Segment("AAPL", "1m", JAN)
        load_segment(conn, segment, minute_bars("AAPL", OPEN_JAN_2, 10), "h9", tz=NY)
        assert count_rows(conn, [segment], timezones=NY, wait=SEGMENT_LOCK_WAIT) == {segment: 10}
        tables = conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'ohlcv_1min_%%'").fetchone()
        assert tables == (1,)  # its primary key index only: no partition, no default


def test_two_loaders_making_the_same_month_at_once(pg_database: ServerInfo) -> None:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def loader(symbols: list[str]) -> None:
        try:
            with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
                start.wait()
                for month, first in ((JAN, OPEN_JAN_2), (FEB, OPEN_FEB_1)):
                    load_segments(conn, _month_load(symbols, month, first, 5_000))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loader, args=(s,)) for s in (["AAPL", "MSFT"], ["NVDA", "AMZN"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    with psycopg.connect(pg_database.dsn()) as conn:
        assert existing_months(conn, "ohlcv_1min") == {JAN, FEB}
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == (40_000,)
        assert len(read_loaded_segments(conn)) == 8


def test_kill_9_while_filling_a_new_month_leaves_no_partition_and_no_ledger_row(
    pg_database: ServerInfo,
) -> None:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
    child = textwrap.dedent(
        """
        import datetime as dt, sys, psycopg
        from refresher.load import SegmentLoad, load_segments
        from refresher.segments import Segment
        from tests.fixtures_postgres import minute_bars
        first = dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC)
        loads = [SegmentLoad(Segment(f"S{k:03d}", "1m", dt.date(2024, 1, 1)), minute_bars(f"S{k:03d}", first,
                 40_000), "h", "America/New_York") for k in range(60)]
        with psycopg.connect(sys.argv[1], autocommit=True) as conn:
            print(conn.info.backend_pid, flush=True)
            load_segments(conn, loads)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, pg_database.dsn()], stdout=subprocess.PIPE, text=True
    )
    try:  # a failure before the kill left the child loading (60 segments) and its pipe open
        assert proc.stdout is not None
        backend = int(proc.stdout.readline())
        proc.stdout.close()
        with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while conn.execute(  # the partition exists (uncommitted) and its COPY is running
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE 'COPY%%FREEZE%%'",
                (backend,),
            ).fetchone() == (0,):
                assert proc.poll() is None and time.monotonic() < deadline, "the child never reached its COPY"
                time.sleep(0.01)
    finally:
        reap(proc)  # kill -9, what the test is about; on a failure's way out too
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone() != (
            0,
        ):
            assert time.monotonic() < deadline, "the server kept the killed client's transaction"
            time.sleep(0.05)
        assert existing_months(conn, "ohlcv_1min") == set()
        assert conn.execute("SELECT to_regclass('ohlcv_1min_2024_01')").fetchone() == (None,)
        assert read_loaded_segments(conn) == {}
        load_segments(conn, _month_load(["AAPL"], JAN, OPEN_JAN_2))  # the next load makes the month afresh
        assert existing_months(conn, "ohlcv_1min") == {JAN}
