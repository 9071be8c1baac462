"""The target schema and the refresher_segments ledger, on a real server."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import psycopg
import pytest

from refresher.database import (
    LoadedSegment,
    count_rows,
    ensure_schema,
    read_ledger_rows,
    read_loaded_segments,
    schema_exists,
    segment_range,
    upsert_symbols,
)
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.load import SEGMENT_LOCK_WAIT, load_segment
from refresher.profile import Listing
from refresher.schema import SCHEMA_OF
from refresher.segments import TABLE_OF, Segment
from tests.fixtures_postgres import daily_bars, minute_bars
from tests.refresher.jobs.test_lost_jobs import _stopped

pytestmark = pytest.mark.postgres
NY = "America/New_York"
JAN = dt.date(2024, 1, 1)
FEB = dt.date(2024, 2, 1)


def test_segment_range_of_minutes_is_the_exchange_local_month() -> None:
    lo, hi = segment_range(Segment("AAPL", "1m", JAN), NY)
    assert lo == dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC)
    assert hi == dt.datetime(2024, 2, 1, 5, tzinfo=dt.UTC)
    assert segment_range(Segment("AAPL", "1d", JAN), NY) == (JAN, FEB)


def test_unknown_time_zone_is_a_load_error() -> None:
    with pytest.raises(LoadError, match="Mars/Olympus"):
        segment_range(Segment("AAPL", "1m", JAN), "Mars/Olympus")


def test_schema_columns_match_the_arrow_schemas_in_order(pg_conn: psycopg.Connection[Any]) -> None:
    ensure_schema(pg_conn)
    ensure_schema(pg_conn)  # idempotent
    for timeframe, table in TABLE_OF.items():
        rows = pg_conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
        assert [r[0] for r in rows] == SCHEMA_OF[timeframe].names
    pk = pg_conn.execute(
        "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_constraint c "
        "CROSS JOIN unnest(c.conkey) WITH ORDINALITY k(attnum, n) "
        "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
        "WHERE c.conrelid = 'refresher_segments'::regclass AND c.contype = 'p'"
    ).fetchone()
    assert pk == (["symbol", "timeframe", "month"],)


def test_read_loaded_segments_before_and_after_loading(pg_conn: psycopg.Connection[Any]) -> None:
    assert read_loaded_segments(pg_conn) == {}  # no schema yet: nothing loaded, no error
    assert not schema_exists(pg_conn)
    ensure_schema(pg_conn)
    assert schema_exists(pg_conn)
    segment = Segment("AAPL", "1d", JAN)
    load_segment(pg_conn, segment, daily_bars("AAPL", JAN, 20), "hash-a", tz=NY)
    loaded = read_loaded_segments(pg_conn)
    assert list(loaded) == [segment]
    assert isinstance(loaded[segment], LoadedSegment)
    assert (loaded[segment].content_hash, loaded[segment].rows) == ("hash-a", 20)
    assert loaded[segment].loaded_at.tzinfo is not None


def test_read_ledger_rows_is_the_ledger_by_segment_id(pg_conn: psycopg.Connection[Any]) -> None:
    assert read_ledger_rows(pg_conn) == {}  # no schema yet
    ensure_schema(pg_conn)
    load_segment(pg_conn, Segment("AAPL", "1d", JAN), daily_bars("AAPL", JAN, 20), "hash-a", tz=NY)
    load_segment(pg_conn, Segment("KO", "1d", JAN), daily_bars("KO", JAN, 0), "hash-e", tz=NY)
    # a row from a future version with another timeframe is not ours, for either reader
    pg_conn.execute("INSERT INTO refresher_segments VALUES ('AAPL', '1w', %s, 'w', 4)", (JAN,))
    rows = read_ledger_rows(pg_conn)
    assert rows == {("AAPL", "1d", JAN): ("hash-a", 20), ("KO", "1d", JAN): ("hash-e", 0)}
    assert {(s.symbol, s.timeframe, s.month) for s in read_loaded_segments(pg_conn)} == set(rows)


def test_count_rows_counts_what_is_really_there(pg_conn: psycopg.Connection[Any]) -> None:
    ensure_schema(pg_conn)
    jan_m, feb_m = Segment("AAPL", "1m", JAN), Segment("AAPL", "1m", FEB)
    jan_d, msft_d = Segment("AAPL", "1d", JAN), Segment("MSFT", "1d", JAN)
    load_segment(
        pg_conn, jan_m, minute_bars("AAPL", dt.datetime(2024, 1, 2, 14, 30, tzinfo=dt.UTC), 390), "h", tz=NY
    )
    load_segment(
        pg_conn, feb_m, minute_bars("AAPL", dt.datetime(2024, 2, 1, 14, 30, tzinfo=dt.UTC), 100), "h", tz=NY
    )
    load_segment(pg_conn, jan_d, daily_bars("AAPL", JAN, 21), "h", tz=NY)
    # A bar at 03:00 UTC on Feb 1st is still January 31st in New York: it belongs to the January segment.
    pg_conn.execute("INSERT INTO ohlcv_1min VALUES ('AAPL', '2024-02-01 03:00+00', 1, 1, 1, 1, 1)")
    pg_conn.execute("DELETE FROM ohlcv_daily WHERE date = '2024-01-05'")  # drift the ledger cannot see
    pg_conn.commit()
    counts = count_rows(
        pg_conn, [jan_m, feb_m, jan_d, msft_d], timezones={"AAPL": NY, "MSFT": NY}, wait=SEGMENT_LOCK_WAIT
    )
    assert counts == {jan_m: 391, feb_m: 100, jan_d: 20, msft_d: 0}
    assert count_rows(pg_conn, [jan_m], timezones="UTC", wait=SEGMENT_LOCK_WAIT) == {
        jan_m: 390
    }  # in UTC the extra bar is February's


def test_count_rows_of_minutes_needs_a_time_zone(pg_conn: psycopg.Connection[Any]) -> None:
    ensure_schema(pg_conn)
    assert count_rows(pg_conn, [Segment("AAPL", "1d", JAN)], wait=SEGMENT_LOCK_WAIT) == {
        Segment("AAPL", "1d", JAN): 0
    }
    with pytest.raises(LoadError, match="time zone"):
        count_rows(pg_conn, [Segment("AAPL", "1m", JAN)], wait=SEGMENT_LOCK_WAIT)


def test_upsert_symbols(pg_conn: psycopg.Connection[Any]) -> None:
    ensure_schema(pg_conn)
    assert upsert_symbols(pg_conn, [("AAPL", "XNAS", "equity"), ("ES", None, "future")]) == 2
    upsert_symbols(pg_conn, [Listing("AAPL", "XNYS", "equity", 0)])
    rows = pg_conn.execute("SELECT * FROM symbols ORDER BY symbol").fetchall()
    assert rows == [("AAPL", "XNYS", "equity"), ("ES", None, "future")]
    versions = pg_conn.execute("SELECT symbol, xmin::text FROM symbols ORDER BY symbol").fetchall()
    pg_conn.commit()
    assert upsert_symbols(pg_conn, [("ES", None, "future"), ("AAPL", "XNYS", "equity")]) == 2
    assert pg_conn.execute("SELECT symbol, xmin::text FROM symbols ORDER BY symbol").fetchall() == versions
    upsert_symbols(pg_conn, [("KO", "XNYS", "equity"), ("KO", "XNAS", "equity")])  # the last one given wins
    assert pg_conn.execute("SELECT exchange FROM symbols WHERE symbol = 'KO'").fetchone() == ("XNAS",)


def test_a_refresh_stopped_inside_the_schema_setup_holds_the_next_one_up_only_until_the_server_ends_it(
    pg_database: ServerInfo,
) -> None:
    """A refresh stopped (SIGSTOP, Ctrl-Z, a suspended machine) inside ``ensure_schema``'s transaction kept the
    schema lock for as long as it stayed stopped, and the next refresh's schema setup waited on it for ever (a
    worker's sessions set ``idle_in_transaction_session_timeout``, a refresh's none). The transaction sets it for
    itself: the server ends the stopped session, its DDL rolled back, and the next setup goes on."""
    child = textwrap.dedent(
        """
        import os, signal, sys, psycopg
        from refresher import database, ledger_counter
        ledger_counter.SCHEMA_IDLE_TIMEOUT = 1.0
        def stop(conn, table):  # inside ensure_schema's transaction, the schema lock held
            os.kill(os.getpid(), signal.SIGSTOP)
        database.ensure_ledger_counter = stop
        with psycopg.connect(sys.argv[1], autocommit=True, application_name="stopped") as conn:
            database.ensure_schema(conn)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", child, pg_database.dsn()], stderr=subprocess.PIPE
    ) as stopped:
        try:
            deadline = time.monotonic() + 60
            while not _stopped(stopped.pid):
                assert stopped.poll() is None and time.monotonic() < deadline, stopped.communicate()
                time.sleep(0.01)
            with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
                conn.execute("SET lock_timeout = '30s'")  # before: the setup waited here for ever
                ensure_schema(conn)
                sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stopped'"
                assert conn.execute(sessions).fetchone() == (0,)
                assert schema_exists(conn)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
            stopped.kill()


def test_the_schema_setup_inside_a_callers_transaction_leaves_its_idle_timeout_alone(
    pg_conn: psycopg.Connection[Any],
) -> None:
    """The idle timeout is the schema transaction's own: inside a caller's transaction (a savepoint) it would
    outlive it there, and end a caller that pauses between its own statements."""
    pg_conn.execute("SELECT 1")
    ensure_schema(pg_conn)
    row = pg_conn.execute("SELECT current_setting('idle_in_transaction_session_timeout')").fetchone()
    assert row == ("0",)
    pg_conn.commit()
    ensure_schema(pg_conn)  # a transaction of its own: the setting is gone with it
    row = pg_conn.execute("SELECT current_setting('idle_in_transaction_session_timeout')").fetchone()
    assert row == ("0",)
