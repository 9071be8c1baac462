"""Many segments per transaction, and appending a segment's new sessions: on a real server, each compared with a
clean load by per-segment checksums."""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from featurestore.fingerprint import fingerprint_table
from refresher import load
from refresher.database import ensure_schema, read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.features import tables
from refresher.fence import SEGMENTS_HELD, advisory_locked
from refresher.jobs.retry import is_transient
from refresher.load import SegmentLoad, conform_many, load_segments
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars

pytestmark = pytest.mark.postgres
MONTHS = [dt.date(2024, m, 1) for m in range(1, 7)]

CHECKSUMS = """
SELECT symbol, to_char(date, 'YYYY-MM'),
       md5(string_agg(concat_ws(',', date, open, high, low, close, volume), ';' ORDER BY date))
FROM ohlcv_daily GROUP BY 1, 2
"""


def _item(symbol: str, month: dt.date, days: int = 21, *, seed: int = 0) -> SegmentLoad:
    # The first ``days`` of one month-long series: a shorter item's rows are a prefix of a longer one's.
    table = daily_bars(symbol, month, 28, seed=seed).slice(0, days)
    return SegmentLoad(Segment(symbol, "1d", month), table, fingerprint_table(table), "UTC")


def _batch(symbols: str = "ABCDEFGH", days: int = 21) -> list[SegmentLoad]:
    return [_item(symbol, month, days) for symbol in symbols for month in MONTHS]


def _state(conn: psycopg.Connection[Any]) -> tuple[dict[Any, str], dict[Segment, tuple[str, int]]]:
    sums = {(symbol, month): digest for symbol, month, digest in conn.execute(CHECKSUMS)}
    ledger = {s: (row.content_hash, row.rows) for s, row in read_loaded_segments(conn).items()}
    return sums, ledger


@pytest.fixture
def conn(pg_conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    ensure_schema(pg_conn)
    pg_conn.commit()
    return pg_conn


@pytest.fixture
def clean(pg_server: ServerInfo) -> Iterator[Callable[[list[SegmentLoad]], Any]]:
    """The state a fresh database (one per call) holds after one clean load of the given items."""
    names: list[str] = []

    def load_clean(items: list[SegmentLoad]) -> Any:
        names.append(f"t_{secrets.token_hex(6)}")
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names[-1])))
        with psycopg.connect(replace(pg_server, dbname=names[-1]).dsn()) as other:
            ensure_schema(other)
            load_segments(other, items)
            return _state(other)

    yield load_clean
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_batch_loads_every_segment_with_its_own_ledger_row(conn: psycopg.Connection[Any]) -> None:
    items = _batch()
    outcome = load_segments(conn, items)
    assert outcome.rows == (21,) * len(items) and not outcome.appended and not outcome.emptied
    sums, ledger = _state(conn)
    assert ledger == {item.segment: (item.content_hash, 21) for item in items}
    assert len(sums) == len(items)


def test_a_bad_segment_leaves_nothing_of_its_batch(conn: psycopg.Connection[Any]) -> None:
    load_segments(conn, _batch("AB"))
    before = _state(conn)
    items = _batch("ABCD", days=22)
    bad = items[len(items) // 2]
    items[len(items) // 2] = SegmentLoad(
        bad.segment, bad.table.set_column(2, "open", pa.array([None] * 22, pa.float64())), "h", "UTC"
    )
    with pytest.raises(LoadError, match=f"^{bad.segment}: column open has nulls"):
        load_segments(conn, items)
    assert _state(conn) == before  # neither the new segments nor the changed old ones


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("symbol", "B", "rows of other symbols"), ("date", dt.date(2024, 12, 2), "fall outside the segment")],
)
def test_one_wrong_row_inside_a_batch_is_refused_naming_its_segment(
    column: str, value: Any, message: str
) -> None:
    """Checked per segment (its first row's symbol, where the symbol changes, its least and greatest time):
    a row in the middle of a segment in the middle of a batch is found, and its segment named."""
    items = _batch("AB")
    bad = items[3]  # neither the first segment nor, below, its first or last row
    values = bad.table.column(column).to_pylist()
    values[10] = value
    field = bad.table.schema.get_field_index(column)
    table = bad.table.set_column(field, column, pa.array(values, bad.table.schema.field(field).type))
    items[3] = replace(bad, table=table)
    with pytest.raises(LoadError, match=f"^{bad.segment}: .*{message}"):
        conform_many(items)
    assert len(conform_many(_batch("AB"))) == len(items)


def test_a_failing_statement_rolls_back_the_whole_batch(conn: psycopg.Connection[Any]) -> None:
    items = _batch("AB")
    duplicate = items[3]
    twice = pa.concat_tables([duplicate.table, duplicate.table.slice(0, 1)])
    items[3] = SegmentLoad(duplicate.segment, twice, "h", "UTC")  # a primary-key violation inside the COPY
    with pytest.raises(LoadError, match=r"\(and 11 more in its batch\): loading failed"):
        load_segments(conn, items)
    assert _state(conn) == ({}, {})


def test_appending_new_sessions_equals_a_clean_load(conn: psycopg.Connection[Any], clean: Any) -> None:
    load_segments(conn, _batch(days=20))
    grown = _batch(days=21)  # every month one session longer, as a daily refresh sees its current month
    outcome = load_segments(conn, grown)
    assert outcome.appended == {item.segment for item in grown}
    assert outcome.rows == (1,) * len(grown)  # only the new session's row was copied
    assert _state(conn) == clean(grown)


def test_a_back_fill_inside_the_month_reloads_the_segment(conn: psycopg.Connection[Any], clean: Any) -> None:
    load_segments(conn, [_item("A", MONTHS[0], 20), _item("B", MONTHS[0], 20)])
    back_filled = [_item("A", MONTHS[0], 21, seed=1), _item("B", MONTHS[0], 21)]  # A changed inside
    outcome = load_segments(conn, back_filled)
    assert outcome.appended == {back_filled[1].segment} and outcome.rows == (21, 1)
    assert _state(conn) == clean(back_filled)


def test_no_append_where_the_ledger_is_not_to_be_trusted(conn: psycopg.Connection[Any]) -> None:
    first = _item("A", MONTHS[0], 20)
    load_segments(conn, [first])
    conn.execute("DELETE FROM ohlcv_daily WHERE date = %s", (MONTHS[0],))  # by hand: --verify's case
    conn.commit()
    longer = _item("A", MONTHS[0], 21)
    forced = SegmentLoad(longer.segment, longer.table, longer.content_hash, "UTC", may_append=False)
    assert load_segments(conn, [forced]).rows == (21,)
    assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone() == (21,)


def test_kill_9_mid_batch_then_rerun_equals_a_clean_load(
    pg_database: ServerInfo, conn: psycopg.Connection[Any], clean: Any
) -> None:
    # The child loads the first batch, then dies by SIGKILL inside the second: after its COPY, before its
    # ledger rows, the worst moment. The second batch appends to some segments and adds others.
    child = textwrap.dedent(
        """
        import os, signal, sys, psycopg
        import refresher.load
        from tests.refresher.test_load_batch import _batch
        with psycopg.connect(sys.argv[1], autocommit=True) as conn:
            refresher.load.load_segments(conn, _batch("ABCD", days=20))
            refresher.load._record = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
            refresher.load.load_segments(conn, _batch("ABCDEFGH", days=21))
        """
    )
    done = subprocess.run([sys.executable, "-c", child, pg_database.dsn()], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr
    after_first = clean(_batch("ABCD", days=20))
    assert _state(conn) == after_first  # nothing of the killed batch
    load_segments(conn, _batch("ABCDEFGH", days=21))  # the re-run
    assert _state(conn) == clean(_batch("ABCDEFGH", days=21))


def test_two_overlapping_batches_at_once_take_turns(pg_database: ServerInfo, clean: Any) -> None:
    def load(symbols: str) -> None:
        with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
            for days in (19, 20, 21):  # appends and reloads, racing the other thread's
                load_segments(conn, _batch(symbols, days=days))

    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(load, ["ABCDEF", "FEDCBA"]))
        assert _state(conn) == clean(_batch("ABCDEF", days=21))


def test_an_emptied_segment_is_refused_and_the_rest_of_its_batch_loads(conn: psycopg.Connection[Any]) -> None:
    load_segments(conn, [_item("A", MONTHS[0]), _item("B", MONTHS[0])])
    empty = daily_bars("A", MONTHS[0], 0)
    items = [SegmentLoad(Segment("A", "1d", MONTHS[0]), empty, "e", "UTC"), _item("B", MONTHS[0], 22)]
    outcome = load_segments(conn, items, allow_shrink=False)
    assert outcome.emptied == ((items[0].segment, 21),)
    ledger = _state(conn)[1]
    assert ledger[items[0].segment][1] == 21 and ledger[items[1].segment] == (items[1].content_hash, 22)


def test_a_reload_that_is_not_longer_never_hashes_for_an_append(
    conn: psycopg.Connection[Any], clean: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefix hash costs a pass over the old rows: only a table longer than the loaded one can be an
    append, so an equal-length change (a corrected bar) or a shorter one reloads without it."""
    from refresher import load

    load_segments(conn, [_item("A", MONTHS[0], 21), _item("B", MONTHS[0], 21)])
    hashed: list[int] = []
    monkeypatch.setattr(load, "fingerprint_table", lambda table, *a: hashed.append(table.num_rows) or "")
    changed = [_item("A", MONTHS[0], 21, seed=1), _item("B", MONTHS[0], 20)]  # same length, then shorter
    assert load_segments(conn, changed).rows == (21, 20)
    assert hashed == []
    assert _state(conn) == clean(changed)


def test_a_batchs_delete_reads_the_daily_table_by_its_key_before_any_analyze(
    conn: psycopg.Connection[Any],
) -> None:
    # Mid-way through a cold load of the production daily profile: 300,000 rows that no ANALYZE has seen. The
    # DELETE's whole-range bounds (for pruning partitions; this table has none) left the planner's default
    # selectivity of 0.5%, so it scanned and sorted the whole table for every batch (a merge join), 0.5-1 s a
    # batch and growing with the table; by the key it reads only the batch's segments. Autovacuum kept out, so
    # the table stays unanalyzed.
    conn.execute("ALTER TABLE ohlcv_daily SET (autovacuum_enabled = false)")
    conn.execute(
        "INSERT INTO ohlcv_daily SELECT 'S' || s, d, 1, 1, 1, 1, 1 FROM generate_series(1, 160) s, "
        "generate_series(date '2020-01-01', date '2025-02-28', interval '1 day') d"
    )
    conn.commit()
    stats = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'ohlcv_daily'").fetchone()
    assert stats == (-1,)  # never analyzed
    items = [_item(f"T{i}", month, 2) for i in range(500) for month in MONTHS]
    # Read before and after, in one transaction: a backend's pending counts (what pg_stat_xact_* shows) also
    # hold its earlier transactions' scans (the schema's) until it flushes them, at most once a second.
    scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'ohlcv_daily'"
    with conn.transaction():
        before = conn.execute(scans).fetchone()
        load_segments(conn, items)
        assert conn.execute(scans).fetchone() == before
    assert conn.execute("SELECT count(*) FROM ohlcv_daily WHERE symbol LIKE 'T%'").fetchone() == (1000 * 6,)


@contextmanager
def held_in_a_copy(
    dsn: str,
    items: list[SegmentLoad] | Callable[[psycopg.Connection[Any]], object],
    *,
    live: float = 0,
    at: int = 1,
) -> Iterator[tuple[int, list[BaseException]]]:
    """A load of ``items`` (segments, or a load of its own on the connection given: a feature's) on a session of
    its own (a thread), held up in a COPY before its ``at``-th: it sends nothing until the block ends (a loader
    stopped there, SIGSTOP) or, ``live``, 64 KB of rows every 20 ms for that many seconds (a loader busy with a
    long batch); then it goes on. Yields its session's pid and what it failed with (read once the block ends),
    once the server shows that session waiting for the COPY's data."""
    copying, go_on, failed, pid = threading.Event(), threading.Event(), list[BaseException](), list[int]()
    calls = iter(range(at, 0, -1))
    real_copy = load.copy_arrow

    def copy_held(conn: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "holder" and next(calls, 0) == 1:
            with conn.cursor().copy("COPY pg_temp.filler (x) FROM STDIN") as copy:
                copy.write("1\n")
                copying.set()
                until = time.monotonic() + live
                while not go_on.wait(0.02) and not (live and time.monotonic() > until):
                    if live:
                        copy.write("1\n" * 32768)
        real_copy(conn, *args, **kwargs)

    def run() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as holder:
                pid.append(holder.info.backend_pid)
                holder.execute("CREATE TEMP TABLE filler (x int)")
                if callable(items):
                    items(holder)
                else:
                    load_segments(holder, items)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="holder")
    with pytest.MonkeyPatch.context() as patch, psycopg.connect(dsn, autocommit=True) as look:
        patch.setattr(load, "copy_arrow", copy_held)
        patch.setattr(tables, "copy_arrow", copy_held)
        thread.start()
        try:
            assert copying.wait(60), failed
            waiting = (
                "SELECT state = 'active' AND wait_event = 'ClientRead' FROM pg_stat_activity WHERE pid = %s"
            )
            deadline = time.monotonic() + 60
            while look.execute(waiting, (pid[0],)).fetchone() != (True,):
                assert time.monotonic() < deadline, (
                    f"the holder's COPY never waited for its client in 60 s: {failed}"
                )
                time.sleep(0.01)
            yield pid[0], failed
        finally:
            go_on.set()
            thread.join()


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(load, "SEGMENT_LOCK_WAIT", 0.5, raising=False)
    return 0.5


def test_a_load_ends_a_loader_stalled_in_its_copy_and_loads(
    pg_database: ServerInfo, clean: Any, short_wait: float
) -> None:
    """A loader stopped in the middle of its COPY (SIGSTOP, a suspended machine) kept its segments' locks for as
    long as it stayed stopped, and a refresh loading one of them waited as long: for ever, since the server ends
    no session active in a COPY. Past the wait, the load ends the session that read nothing all along and
    takes the locks; the stopped loader finds its session gone and commits nothing."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        with held_in_a_copy(pg_database.dsn(), _batch("ABCD", days=20)) as (_, failed):
            load_segments(conn, _batch("CDEF"))
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert _state(conn) == clean(_batch("CDEF"))


def test_a_live_load_past_the_wait_is_waited_for(
    pg_database: ServerInfo, clean: Any, short_wait: float
) -> None:
    """A load whose segments another load holds past the wait while its COPY reads rows all along waits for it,
    as before the wait was bounded: nothing is ended, both commit. The rows read are looked at inside the
    waiting load's transaction, where the server keeps one view of the sessions until it ends unless told to
    look again: without that look the live COPY had read nothing, and it was ended."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        with held_in_a_copy(pg_database.dsn(), _batch("ABCD", days=20), live=2.0) as (_, failed):
            load_segments(conn, _batch("CDEF"))
        assert not failed, failed
        assert _state(conn) == clean([*_batch("AB", days=20), *_batch("CDEF")])


def test_a_loader_stopped_between_statements_fails_the_load_in_one_line_naming_it(
    pg_database: ServerInfo, short_wait: float
) -> None:
    """A loader stopped between two statements of its load (idle inside its transaction, its segments' locks
    held) is no COPY to end: the load waits its wait, then fails in one line naming that session, a lock timeout
    (a worker tries it again), where it waited for ever."""
    ids = [load.segment_lock_id(item.segment) for item in _batch("C")]
    with (
        psycopg.connect(pg_database.dsn(), autocommit=True) as conn,
        psycopg.connect(pg_database.dsn()) as holder,
    ):
        ensure_schema(conn)
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        holder.execute("SELECT pg_advisory_xact_lock(id) FROM unnest(%s::bigint[]) AS id", (ids,))
        with pytest.raises(LoadError, match=r"held their lock for over 0.5 s \(pid \d+ ") as caught:
            load_segments(conn, _batch("CDEF"))
        assert f"pid {holder.info.backend_pid} (" in str(caught.value) and "idle in transaction" in str(
            caught.value
        )
        assert "\n" not in str(caught.value) and is_transient(caught.value)
        assert _state(conn) == ({}, {})


def test_segment_locks_are_tried_in_order_up_to_the_first_one_held(pg_database: ServerInfo) -> None:
    """The uncontended case takes the locks in one statement without waiting; when one is held, the locks taken
    before the wait are those before it in the order, so the wait takes the rest in order as every load does (a
    lock after it taken first would let two overlapping loads deadlock)."""
    ids = sorted(load.segment_lock_id(item.segment) for item in _batch("AB")[:3])
    with (
        psycopg.connect(pg_database.dsn(), autocommit=True) as other,
        psycopg.connect(pg_database.dsn(), autocommit=True) as conn,
    ):
        other.execute("SELECT pg_advisory_lock(%s)", (ids[1],))
        with conn.transaction():
            with pytest.raises(psycopg.errors.LockNotAvailable):
                advisory_locked(conn, 0.1, "id", "unnest(%s::bigint[]) AS id", (ids,), SEGMENTS_HELD, (ids,))
            held = conn.execute(
                "SELECT (classid::bigint << 32 | objid::bigint) FROM pg_locks WHERE locktype = 'advisory' "
                "AND pid = pg_backend_pid() AND granted",
            ).fetchall()
        assert held == [(ids[0],)]
