"""``refresher.fence``: a check costs one round trip, waits for the fence's row no longer than its ``wait``, and
leaves the rest of the caller's transaction under the caller's own ``lock_timeout``. A real embedded Postgres."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.fence import Fence, FenceLost

pytestmark = pytest.mark.postgres


@pytest.fixture
def fenced(pg_database: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection (a worker's) to a database whose fence ``f`` holds token 5."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        Fence("f", 5).claim(conn)
        conn.execute("CREATE TABLE other (x int)")
        yield conn


def _sent(conn: psycopg.Connection[Any], trace: Path, action: Any) -> list[str]:
    """The protocol messages the client sent while ``action`` ran (libpq's own trace of the connection)."""
    fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        conn.pgconn.trace(fd)
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        action()
        conn.pgconn.untrace()
    finally:
        os.close(fd)
    lines = trace.read_text().splitlines()
    return [line.split("\t")[2].strip().split(" ")[0] for line in lines if line.startswith("F\t")]


def test_a_check_is_one_round_trip(fenced: psycopg.Connection[Any], tmp_path: Path) -> None:
    # It read the caller's lock_timeout, set it, ran the query and set it back: four Syncs, each a round trip.
    with fenced.transaction():
        sent = _sent(fenced, tmp_path / "trace", lambda: Fence("f", 5).check(fenced))
    assert sent.count("Sync") + sent.count("Query") == 1, sent


def _commit_once_waited_for(holder: psycopg.Connection[Any], dsn: str, waiter: int, hold: float) -> None:
    """Commit ``holder`` ``hold`` seconds after the session ``waiter`` (a backend's pid) is seen waiting for a lock
    (at once after a minute: a waiter that never waits fails its test on its own)."""
    deadline = time.monotonic() + 60
    waiting = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while watcher.execute(waiting, (waiter,)).fetchone() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(hold)
    holder.commit()


def test_the_rest_of_the_transaction_runs_under_the_callers_lock_timeout(
    fenced: psycopg.Connection[Any], pg_database: ServerInfo
) -> None:
    # The check waits 50 ms at most for the fence's row; the caller's own statements after it wait as long as the
    # caller chose: here a table another session holds for 0.5 s once the caller waits for it, the caller's
    # lock_timeout 5 s. (Held 0.5 s from the start, a loaded machine's check and SHOW took most of it: the LOCK
    # waited less than 0.3 s, or not at all.)
    fenced.execute("SET lock_timeout = '5s'")
    with psycopg.connect(pg_database.dsn()) as holder:
        holder.execute("LOCK TABLE other IN ACCESS EXCLUSIVE MODE")
        release = threading.Thread(
            target=_commit_once_waited_for, args=(holder, pg_database.dsn(), fenced.info.backend_pid, 0.5)
        )
        release.start()
        try:
            with fenced.transaction():
                Fence("f", 5, wait=0.05).check(fenced)
                assert fenced.execute("SHOW lock_timeout").fetchone() == ("5s",)
                began = time.monotonic()
                fenced.execute("LOCK TABLE other IN ACCESS SHARE MODE")
                assert time.monotonic() - began >= 0.3
        finally:
            release.join()
    # A value the caller set for its transaction alone is the one it gets back, and goes with the transaction.
    with fenced.transaction():
        fenced.execute("SET LOCAL lock_timeout = '7s'")
        Fence("f", 5, wait=0.05).check(fenced)
        assert fenced.execute("SHOW lock_timeout").fetchone() == ("7s",)
    assert fenced.execute("SHOW lock_timeout").fetchone() == ("5s",)


def test_a_row_held_past_the_wait_is_a_load_error_and_the_transaction_rolls_back(
    fenced: psycopg.Connection[Any], pg_database: ServerInfo
) -> None:
    with psycopg.connect(pg_database.dsn()) as holder:
        holder.execute("SELECT 1 FROM refresher_fences WHERE fence = 'f' FOR UPDATE")
        kept = r"f: another holder's transaction kept the fence for over 0.1 s"
        with pytest.raises(LoadError, match=kept), fenced.transaction():
            fenced.execute("INSERT INTO other VALUES (1)")
            Fence("f", 5, wait=0.1).check(fenced)
        with pytest.raises(LoadError, match="kept the fence"):
            Fence("f", 6, wait=0.1).claim(fenced)
    # Its transaction rolled back; the connection goes on as the caller's.
    assert fenced.info.transaction_status == pq.TransactionStatus.IDLE
    assert fenced.execute("SELECT count(*) FROM other").fetchone() == (0,)
    assert fenced.execute("SHOW lock_timeout").fetchone() == ("0",)
    Fence("f", 6).claim(fenced)
    with pytest.raises(FenceLost), fenced.transaction():
        Fence("f", 5).check(fenced)


def _copying(
    holder: psycopg.Connection[Any],
    copied: threading.Event,
    go_on: threading.Event,
    live: bool,
    failed: list[Any],
) -> None:
    """``holder``'s write transaction (its fence check, token 5) in a COPY into ``other``: ``copied`` set once it
    began; then it sends ``live`` its rows, 64 KB every 20 ms, or nothing (a stopped worker) until ``go_on``.
    What it failed with goes into ``failed``."""
    try:
        with holder.transaction():
            Fence("f", 5).check(holder)
            with holder.cursor().copy("COPY other (x) FROM STDIN") as copy:
                copy.write("1\n")
                copied.set()
                while not go_on.wait(0.02):
                    if live:
                        copy.write("1\n" * 32768)
    except psycopg.Error as exc:
        failed.append(exc)


def _wait_reading(conn: psycopg.Connection[Any], pid: int) -> None:
    """Until the server shows session ``pid`` in its COPY waiting for its client's data, as a stopped worker's stays:
    right after the COPY began it may still be active with no wait event, and a claim whose first look missed it
    fails that attempt (the next one ends the session); failed here 1 in 8 beside a CI run."""
    deadline = time.monotonic() + 30
    waiting = "SELECT wait_event = 'ClientRead' FROM pg_stat_activity WHERE pid = %s"
    while conn.execute(waiting, (pid,)).fetchone() != (True,):
        assert time.monotonic() < deadline, "the COPY never waited for its client"
        time.sleep(0.01)


def test_a_claim_ends_a_session_stalled_inside_a_copy_and_only_that(
    fenced: psycopg.Connection[Any], pg_database: ServerInfo
) -> None:
    """A writer stopped in the middle of its COPY kept the fence's row for as long as it stayed stopped: every
    claim timed out. A claim that waited out its whole wait for a COPY that read nothing ends that session and
    claims the fence: the writer finds its session gone and nothing of its transaction committed. A COPY that
    reads its client's rows all along is a live writer's: waited for, and the claim fails as before."""
    for live in (True, False):
        copied, go_on, failed = threading.Event(), threading.Event(), list[Any]()
        with psycopg.connect(pg_database.dsn(), autocommit=True) as holder:
            writer = threading.Thread(target=_copying, args=(holder, copied, go_on, live, failed))
            writer.start()
            try:
                assert copied.wait(30)
                if live:
                    with pytest.raises(LoadError, match="kept the fence"):
                        Fence("f", 6, wait=0.5).claim(fenced)
                else:
                    _wait_reading(fenced, holder.info.backend_pid)
                    Fence("f", 6, wait=0.5).claim(fenced)  # before: LoadError, the fence kept
            finally:
                go_on.set()
                writer.join()
        if live:
            assert not failed and fenced.execute("SELECT count(*) > 0 FROM other").fetchone() == (True,)
            fenced.execute("TRUNCATE other")
        else:
            assert len(failed) == 1 and isinstance(failed[0], psycopg.OperationalError), failed
            assert fenced.execute("SELECT count(*) FROM other").fetchone() == (0,)
            assert fenced.execute("SELECT token FROM refresher_fences WHERE fence = 'f'").fetchone() == (6,)


def test_a_claim_on_a_server_before_14_never_asks_for_copy_progress(
    fenced: psycopg.Connection[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ff81f35's claim read pg_stat_progress_copy, which PostgreSQL 12 and 13 lack: there every claim failed and a
    # queue run's features never loaded. The server here is newer; the client is told it is 13, and the claim must
    # then send no query naming the view, and still take the fence.
    monkeypatch.setattr(psycopg.ConnectionInfo, "server_version", property(lambda _info: 130000))
    trace = tmp_path / "trace"
    assert _sent(fenced, trace, lambda: Fence("f", 6).claim(fenced))
    assert "pg_stat_progress_copy" not in trace.read_text()
    assert fenced.execute("SELECT token FROM refresher_fences WHERE fence = 'f'").fetchone() == (6,)
