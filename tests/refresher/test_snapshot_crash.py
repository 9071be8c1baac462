"""Snapshots that cannot lie: kill -9 between any two statements of a snapshot replacement, then reset."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict

import psycopg
import pytest
from psycopg import sql

from refresher import _snapshot_sql
from refresher.database import read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import SnapshotError
from refresher.load import delete_segment, load_segment
from refresher.pool import checkout_clone, drop_clone, pool_name, pool_status, refill_pool, resize_pool
from refresher.segments import Segment
from refresher.snapshot import has_pristine, is_current, pristine_name, restore_pristine, save_pristine
from tests.fixtures_postgres import daily_bars

pytestmark = pytest.mark.postgres
JAN, FEB = dt.date(2024, 1, 1), dt.date(2024, 2, 1)

# Runs CALL (on ``server``) in a child that SIGKILLs itself right after its N-th SQL statement.
_KILLER = """
import json, os, signal, sys
from refresher import _snapshot_sql, pool, snapshot
from refresher.engines.base import ServerInfo
server = ServerInfo(**json.loads(sys.stdin.read()))
step, count = int(sys.argv[1]), 0
def after_statement():
    global count
    count += 1
    if count == step:
        os.kill(os.getpid(), signal.SIGKILL)
_snapshot_sql._after_statement = after_statement
CALL
"""


def _killed_after(server: ServerInfo, step: int, call: str, *args: str) -> bool:
    """True when ``call`` finished before its ``step``-th statement; False when it was killed. ``args``: its
    ``sys.argv[2:]``."""
    done = subprocess.run(
        [sys.executable, "-c", _KILLER.replace("CALL", call), str(step), *args],
        input=json.dumps(asdict(server)),
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, -signal.SIGKILL), done
    return done.returncode == 0


def _kill_steps(limit: int, never: str) -> Iterator[int]:
    """1, 2, ...: the statement after which a loop's body kills a call, until the body breaks (the call finished);
    fails with ``never`` at ``limit``."""
    yield from range(1, limit)
    pytest.fail(never)


def _save_killed_after(server: ServerInfo, step: int) -> bool:
    return _killed_after(server, step, "snapshot.save_pristine(server, pool_size=1)")


def _state(dsn: str) -> tuple[int, list[Segment]]:
    """What the database holds: its row count and its ledger."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()
        assert row is not None
        return int(row[0]), sorted(read_loaded_segments(conn))


def _databases(server: ServerInfo) -> set[str]:
    with psycopg.connect(server.dsn("postgres")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (server.dbname,)
        )
        return {r[0] for r in rows.fetchall()}


def _toggle_february(server: ServerInfo) -> None:
    """Change the database and its ledger: load February when absent, else delete it."""
    feb = Segment("AAPL", "1d", FEB)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if feb in read_loaded_segments(conn):
            delete_segment(conn, feb, tz="UTC")
        else:
            load_segment(conn, feb, daily_bars("AAPL", FEB, 20), "feb", tz="UTC")


def test_kill_9_after_any_statement_of_a_snapshot_replacement_never_lets_reset_lie(
    loaded: ServerInfo,
) -> None:
    save_pristine(loaded, pool_size=1)
    step, finished = 0, False
    while not finished:
        step += 1
        assert step < 40, "save_pristine never finished"
        _toggle_february(loaded)
        expected = _state(loaded.dsn())
        finished = _save_killed_after(loaded, step)

        # Before any re-run, a reset either refuses in one line or gives exactly what the ledger said.
        try:
            restore_pristine(loaded, refill=False)
        except SnapshotError as exc:
            assert "run `refresher refresh`" in str(exc) and "\n" not in str(exc)
        else:
            assert _state(loaded.dsn()) == expected, f"step {step}: reset restored other data"

        # The re-run (what refresh does) rebuilds only when needed and cleans what the kill left behind.
        if not is_current(loaded):
            save_pristine(loaded, pool_size=1, fill_pool=False)
        refill_pool(loaded)
        db = loaded.dbname
        assert _databases(loaded) == {db, pristine_name(db), pool_name(db, 0)}, f"step {step}"
        assert pool_status(loaded).ready == (pool_name(db, 0),)

        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            conn.execute("TRUNCATE ohlcv_daily, refresher_segments")
        assert restore_pristine(loaded, refill=False).method == "pool"
        assert _state(loaded.dsn()) == expected, f"step {step}"
    assert step > 5  # the kill really landed between the steps of a replacement


def test_a_half_made_pristine_copy_is_not_a_snapshot_and_is_cleaned(loaded: ServerInfo) -> None:
    """What kill -9 during CREATE DATABASE left with older versions: an ordinary, connectable ``__pristine``."""
    db = loaded.dbname
    with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as conn:
        for name in (pristine_name(db), pool_name(db, 0)):
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(db))
            )
    assert not has_pristine(loaded) and not is_current(loaded)
    with pytest.raises(SnapshotError, match="no pristine snapshot"):
        restore_pristine(loaded, refill=False)
    save_pristine(loaded, pool_size=1)
    assert is_current(loaded)
    assert _databases(loaded) == {db, pristine_name(db), pool_name(db, 0)}
    assert restore_pristine(loaded, refill=False).method == "pool"


def test_reset_refuses_when_the_ledger_moved_past_the_snapshot(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    _toggle_february(loaded)  # a refresh loaded February, then died before its snapshot
    before = _state(loaded.dsn())
    assert not is_current(loaded)
    with pytest.raises(SnapshotError, match="predates the database's ledger"):
        restore_pristine(loaded, refill=False)
    assert _state(loaded.dsn()) == before  # refused before touching anything
    save_pristine(loaded, pool_size=1)
    assert is_current(loaded)
    assert _state(loaded.dsn()) == before


def test_kill_9_during_a_resize_leaves_the_old_or_the_new_mark_and_a_pool_that_heals(
    loaded: ServerInfo,
) -> None:
    save_pristine(loaded, pool_size=2)
    kills = 0
    for step in range(1, 20):
        finished = _killed_after(loaded, step, "pool.resize_pool(server, 0)")
        kills += not finished
        status = pool_status(loaded)
        assert status.pristine, f"step {step}: no valid mark"
        assert status.target in (2, 0), f"step {step}"
        assert len(status.ready) <= 2
        # Whichever mark it left, a reset restores the data, and the refill brings the pool to what it says.
        expected = _state(loaded.dsn())
        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            conn.execute("TRUNCATE ohlcv_daily")
        assert restore_pristine(loaded, refill=False).method == ("pool" if status.ready else "template")
        assert _state(loaded.dsn()) == expected
        refill_pool(loaded)
        db, slots = loaded.dbname, range(status.target)
        assert _databases(loaded) == {db, pristine_name(db), *map(lambda n: pool_name(db, n), slots)}, step
        if status.target == 0:
            assert resize_pool(loaded, 2)  # back to the start for the next step
            refill_pool(loaded)
        assert len(pool_status(loaded).ready) == 2
        if finished:
            break
    assert finished and kills > 3  # the kill really landed between the steps of a resize


def test_a_session_left_on_a_pool_clone_neither_fails_a_reset_nor_costs_it_the_servers_wait(
    loaded: ServerInfo,
) -> None:
    """A psql or a database browser connected to a ready clone: the reset's rename of it waited the server's 5 s
    and failed, the database already moved to the trash (none left). Now its session ends with the database's."""
    save_pristine(loaded, pool_size=1)
    clone = pool_status(loaded).ready[0]
    with psycopg.connect(loaded.dsn(clone), autocommit=True) as browser:
        report = restore_pristine(loaded, refill=False)
        assert report.method == "pool"
        with pytest.raises(psycopg.OperationalError):
            browser.execute("SELECT 1")
    assert _state(loaded.dsn()) == (21, [Segment("AAPL", "1d", JAN)])


@contextlib.contextmanager
def _one_connecting_after_the_ending(server: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A session connects to ``server.dbname`` right after the first ending of its sessions; it must be gone."""
    late: list[psycopg.Connection[object]] = []
    real = _snapshot_sql._terminate_others

    def then_one_connects(conn: psycopg.Connection[object], db: str | None, *more: str) -> int:
        ended = real(conn, db, *more)
        if not late and db == server.dbname:
            # The database itself refuses sessions from the reset's last read (its door): one lands on the clone.
            late.append(psycopg.connect(server.dsn(more[0] if more else db), autocommit=True))
        return ended

    monkeypatch.setattr(_snapshot_sql, "_terminate_others", then_one_connects)
    try:
        yield
        assert late  # the late session was there
        with pytest.raises(psycopg.OperationalError):
            late[0].execute("SELECT 1")
    finally:
        for conn in late:
            conn.close()


@pytest.mark.parametrize("pool_size", [1, 0])
def test_a_session_connecting_after_the_reset_ended_the_sessions_does_not_fail_it(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch, pool_size: int
) -> None:
    """A session that connected between the reset's ending of the database's sessions and its rename (our own
    analyzer, a database browser reconnecting) made the rename wait the server's 5 s and fail the reset with
    "being accessed by other users" (seen in CI). It is ended in turn and the rename tried again."""
    save_pristine(loaded, pool_size=pool_size)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily")  # a developer's dirt, the ledger untouched
    with _one_connecting_after_the_ending(loaded, monkeypatch):
        report = restore_pristine(loaded, refill=False)
        assert report.method == ("pool" if pool_size else "template")
    assert _state(loaded.dsn()) == (21, [Segment("AAPL", "1d", JAN)])


def test_a_session_left_on_a_pool_clone_does_not_fail_a_checkout(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    name = f"{loaded.dbname}_c"
    with psycopg.connect(loaded.dsn(pool_status(loaded).ready[0]), autocommit=True):
        dsn = checkout_clone(loaded, name, refill=False)
    try:
        assert _state(dsn) == (21, [Segment("AAPL", "1d", JAN)])
    finally:
        drop_clone(loaded, name)


def test_a_session_left_on_a_pool_clone_does_not_fail_a_smaller_pool(loaded: ServerInfo) -> None:
    """`refresh --pool-size 0` beside a database browser connected to the clones: the rename of each clone out
    of the pool waited the server's 5 s and failed the refresh; now its sessions end, as a checkout's do."""
    save_pristine(loaded, pool_size=2)
    clones = pool_status(loaded).ready
    browsers = [psycopg.connect(loaded.dsn(name), autocommit=True) for name in clones]
    try:
        assert resize_pool(loaded, 0)
    finally:
        for browser in browsers:
            browser.close()
    assert pool_status(loaded).ready == ()
    assert restore_pristine(loaded, refill=False).method == "template"
    assert _state(loaded.dsn()) == (21, [Segment("AAPL", "1d", JAN)])


def test_a_session_connecting_after_the_snapshot_ended_the_sessions_does_not_fail_its_copy(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot's copy of the database retries as a reset's rename does (``_evicting``): a session connecting
    right after its sessions were ended is ended in turn."""
    with _one_connecting_after_the_ending(loaded, monkeypatch):
        save_pristine(loaded, pool_size=0)
    assert is_current(loaded)
