"""The instant reset under attack: kill -9 between any two steps of a reset, a refill or an advance, resets at
once or beside a refill, an older version's pool leftovers, and a client holding a transaction open on the
database."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import conninfo, sql

from refresher import pool, snapshot
from refresher.database import read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError, SnapshotError
from refresher.features.tables import FEATURES_DDL
from refresher.ledger_counter import ensure_ledger_counter
from refresher.load import delete_segment, load_segment
from refresher.pool import pool_name, pool_status, refill_pool
from refresher.segments import Segment
from refresher.snapshot import (
    _live,
    drop_snapshot,
    is_current,
    ledger_version,
    pristine_name,
    restore_pristine,
    save_pristine,
)
from tests.fixtures_postgres import daily_bars
from tests.refresher.test_planner_stats_window import _eventually
from tests.refresher.test_snapshot_crash import (
    FEB,
    _databases,
    _kill_steps,
    _killed_after,
    _state,
    _toggle_february,
)

pytestmark = pytest.mark.postgres


def _refusing(server: ServerInfo) -> bool:
    """Whether ``server.dbname`` exists and refuses new sessions (``ALLOW_CONNECTIONS false``)."""
    with psycopg.connect(server.dsn("postgres")) as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (server.dbname,)
        ).fetchone()
        return row is not None and not row[0]


def _record_commit(committed: list[bool], write: Callable[[], None]) -> None:
    """Run ``write``, a writer beside a reset, and record whether it committed (False: ended or refused)."""
    try:
        write()
        committed.append(True)
    except (psycopg.OperationalError, LoadError):
        committed.append(False)


def _kept_if_committed(server: ServerInfo, committed: list[bool]) -> None:
    """A writer beside a reset either had its commit refused (``committed == [False]``) or keeps February."""
    assert committed
    with psycopg.connect(server.dsn()) as conn:
        has_february = Segment("AAPL", "1d", FEB) in read_loaded_segments(conn)
    assert not committed[0] or has_february, "a committed segment was lost to the reset"


def _dirty(server: ServerInfo) -> None:
    """A developer's dirt: the ledger untouched, so a reset restores."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily")


@pytest.mark.parametrize("pool_size", [1, 0])
def test_kill_9_after_any_statement_of_a_reset_leaves_a_reset_that_restores_the_newest_copy(
    loaded: ServerInfo, pool_size: int
) -> None:
    save_pristine(loaded, pool_size=1)
    _toggle_february(loaded)  # the newest copy holds February too
    save_pristine(loaded, pool_size=pool_size)
    expected = _state(loaded.dsn())
    for step in _kill_steps(40, "restore_pristine never finished"):
        _dirty(loaded)
        finished = _killed_after(loaded, step, "snapshot.restore_pristine(server, refill=False)")
        try:
            state = _state(loaded.dsn())
        except psycopg.OperationalError as exc:  # no database: a reset gives it back
            # Killed between its door's closing and its swap: the database refuses sessions, nothing else.
            assert _refusing(loaded), f"step {step}: the killed reset left no database ({exc})"
            state = expected
        assert state in (expected, (0, expected[1])), f"step {step}"
        assert restore_pristine(loaded, refill=False).method in ("pool", "template")
        assert _state(loaded.dsn()) == expected, f"step {step}"
        refill_pool(loaded)
        db, slots = loaded.dbname, range(pool_size)
        assert _databases(loaded) == {db, pristine_name(db), *(pool_name(db, n) for n in slots)}, step
        if finished:
            break
    assert step > (2 if pool_size else 3)  # the kill really landed between the steps of a reset


def test_kill_9_after_any_statement_of_a_refill_then_a_reset_restores_the_newest_copy(
    loaded: ServerInfo,
) -> None:
    """The refill analyzes a copy not analyzed yet (a swap of the pristine copy) and then clones it."""
    save_pristine(loaded, pool_size=2)
    for step in _kill_steps(60, "the refill never finished"):
        _toggle_february(loaded)
        save_pristine(loaded, fill_pool=False)  # what a refresh does: the refill analyzes and clones later
        expected = _state(loaded.dsn())
        finished = _killed_after(loaded, step, "pool.refill_pool(server)")
        _dirty(loaded)
        restore_pristine(loaded, refill=False)
        assert _state(loaded.dsn()) == expected, f"step {step}"
        refill_pool(loaded)
        db = loaded.dbname
        assert _databases(loaded) == {db, pristine_name(db), pool_name(db, 0), pool_name(db, 1)}, step
        assert pool_status(loaded).ready == (pool_name(db, 0), pool_name(db, 1))
        if finished:
            break
    assert step > 5


def test_two_resets_at_once_both_restore_and_leave_no_stray_database(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    for _ in range(3):
        _dirty(loaded)
        with ThreadPoolExecutor(2) as both:
            reports = list(both.map(lambda _: restore_pristine(loaded, refill=False), range(2)))
        assert sorted(r.method for r in reports) == ["pool", "template"]
        assert _state(loaded.dsn()) == expected
        refill_pool(loaded)
        db = loaded.dbname
        assert _databases(loaded) == {db, pristine_name(db), pool_name(db, 0)}


def test_two_resets_at_once_log_nothing(loaded: ServerInfo, caplog: pytest.LogCaptureFixture) -> None:
    """The second reset's check waits for TAKE while the first swaps, and that swap ends the check's session: it
    raised through psycopg's pipeline and transaction, which logged 'error ignored terminating <Pipeline [BAD]>'
    six lines a time (on a CLI's stderr: no handler), in 7 of 8 tries of two processes at once."""
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    with caplog.at_level(logging.WARNING, logger="psycopg"):
        for _ in range(5):
            _dirty(loaded)
            with ThreadPoolExecutor(2) as both:
                list(both.map(lambda _: restore_pristine(loaded, refill=False), range(2)))
            assert _state(loaded.dsn()) == expected
            refill_pool(loaded)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("psycopg")] == []


@pytest.mark.parametrize("who", ["reset", "connect_working"])
def test_a_door_refusal_whose_reset_swapped_before_the_look_connects_again(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch, who: str
) -> None:
    """A second reset's check (or connect_working) refused by a live reset's shut door looked whether the database
    still refused sessions: when that reset had swapped in between (the clone in place takes sessions), nothing
    was closed, and the refusal was raised, 'not currently accepting connections' (two resets at once, under
    load). Here the first reset's session holds TAKE and shuts the door, and opens it and lets TAKE go right after
    the refusal, before the look."""
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    _dirty(loaded)
    real = snapshot._reopen_abandoned
    with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as first:  # the first reset's session
        ident = sql.Identifier(loaded.dbname)
        first.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (loaded.dbname, snapshot.TAKE))
        first.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))

        def the_first_swaps_then_the_look(conn: psycopg.Connection[Any], db: str) -> bool:
            if not first.closed:
                first.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))
                first.close()  # TAKE goes
            return real(conn, db)

        monkeypatch.setattr(snapshot, "_reopen_abandoned", the_first_swaps_then_the_look)
        if who == "reset":
            assert restore_pristine(loaded, refill=False).method == "pool"  # before: SnapshotError
        else:
            with snapshot.connect_working(loaded, autocommit=True) as conn:  # before: OperationalError
                assert conn.execute("SELECT 1").fetchone() == (1,)
    assert first.closed and not _refusing(loaded)
    if who == "reset":
        assert _state(loaded.dsn()) == expected


def test_a_resets_check_ended_mid_read_by_another_resets_swap_reads_again_and_logs_nothing(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another reset's swap ends every session on the database, a check's among them: one ended in its pipelined
    read failed the reset ('server closed the connection unexpectedly') and psycopg logged 'error ignored
    terminating <Pipeline [BAD]>' (two resets at once, under load). Here the check's session is ended from a side
    connection in the middle of its read, once."""
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    _dirty(loaded)
    real = snapshot.ledger_stamp
    ended: list[int] = []

    def the_swap_ends_it(conn: psycopg.Connection[Any], *args: Any) -> str | None:
        if not ended:
            ended.append(conn.info.backend_pid)
            with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as swap:
                swap.execute("SELECT pg_terminate_backend(%s)", ended)
        return real(conn, *args)

    monkeypatch.setattr(snapshot, "ledger_stamp", the_swap_ends_it)
    with caplog.at_level(logging.WARNING, logger="psycopg"):
        assert restore_pristine(loaded, refill=False).method == "pool"  # before: SnapshotError
    assert ended
    assert [record.getMessage() for record in caplog.records if record.name.startswith("psycopg")] == []
    assert _state(loaded.dsn()) == expected


def test_a_resets_check_connecting_during_another_resets_swap_reads_the_swapped_in_database(
    loaded: ServerInfo,
) -> None:
    """A session starting while another reset renames waits for the renames, then the server says the database
    'does not exist' ('It seems to have just been dropped or renamed'): the check read that as no database, and the
    reset, copying (no clone left), refused when its second read found a ledger ('the pristine snapshot predates
    the database's ledger'). Here the other reset's swap is held uncommitted while the check connects."""
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    db = loaded.dbname
    with ThreadPoolExecutor(1) as second, psycopg.connect(loaded.dsn("postgres")) as first:
        rename = "ALTER DATABASE {} RENAME TO {}"
        first.execute(sql.SQL(rename).format(sql.Identifier(db), sql.Identifier(f"{db}__trash_f1257")))
        first.execute(sql.SQL(rename).format(sql.Identifier(pool_name(db, 0)), sql.Identifier(db)))
        resetting = second.submit(restore_pristine, loaded, refill=False)
        # Its check waits for the renames (a fixed sleep let a loaded machine's check come after the commit).
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as watch:
            blocked = "SELECT 1 FROM pg_locks WHERE NOT granted AND %s = ANY(pg_blocking_pids(pid))"
            _eventually(
                lambda: watch.execute(blocked, (first.info.backend_pid,)).fetchone() is not None,
                "the check never waited for the renames",
            )
        first.commit()
        assert resetting.result(timeout=120).method == "template"  # before: SnapshotError, 'predates'
    assert _state(loaded.dsn()) == expected


def test_a_resets_lock_retry_ends_the_lock_holder_but_not_another_resets_check(loaded: ServerInfo) -> None:
    """A reset whose ledger read waited for a lock ended every session on the database before asking again, another
    reset's check among them: that reset failed with 'terminating connection due to administrator command' (two
    resets at once, flaky). Only the holder ends."""
    save_pristine(loaded, pool_size=1)
    check = conninfo.make_conninfo(loaded.dsn(), options=snapshot._LEDGER_LOCK_WAIT)
    with (
        psycopg.connect(check, autocommit=True) as other_check,
        psycopg.connect(loaded.dsn()) as holder,
        psycopg.connect(check, autocommit=True) as conn,
    ):
        holder.execute("LOCK TABLE refresher_segments IN EXCLUSIVE MODE")  # idle in transaction, holding it
        assert snapshot._stamp_ending_lockers(conn) is not None
        assert other_check.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")


# Runs in the killer child: brings the pristine copy up to the working database by replaying February into a
# clone (the writes ``_toggle_february`` made there).
_ADVANCE = """
from refresher.load import load_segment
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars
import datetime as dt
feb = dt.date(2024, 2, 1)
def apply(conn):
    load_segment(conn, Segment("AAPL", "1d", feb), daily_bars("AAPL", feb, 20), "feb", tz="UTC")
snapshot.advance_pristine(server, sys.argv[2], apply)
"""


def test_kill_9_after_any_statement_of_an_advance_then_a_reset_refuses_or_restores_the_newest(
    loaded: ServerInfo,
) -> None:
    """A refresh's replay of its writes into a clone, swapped in as the new pristine copy (``advance_pristine``)."""
    for step in _kill_steps(40, "advance_pristine never finished"):
        drop_snapshot(loaded)
        _drop_february(loaded)
        save_pristine(loaded, pool_size=1)
        base = _live(loaded, ledger_version)
        assert base is not None
        _toggle_february(loaded)
        expected = _state(loaded.dsn())
        finished = _killed_after(loaded, step, _ADVANCE, str(base))
        try:
            restore_pristine(loaded, refill=False)
        except SnapshotError as exc:
            assert "run `refresher refresh`" in str(exc) and "\n" not in str(exc)
            assert not finished, f"step {step}: the advance finished, yet the reset refuses"
        assert _state(loaded.dsn()) == expected, f"step {step}"
        if not is_current(loaded):
            save_pristine(loaded, fill_pool=False)
        refill_pool(loaded)
        db = loaded.dbname
        assert _databases(loaded) == {db, pristine_name(db), pool_name(db, 0)}, f"step {step}"
        _dirty(loaded)
        assert restore_pristine(loaded, refill=False).method == "pool"
        assert _state(loaded.dsn()) == expected, f"step {step}"
        if finished:
            break
    assert step > 5  # the kill really landed between the steps of an advance


def _drop_february(server: ServerInfo) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if Segment("AAPL", "1d", FEB) in read_loaded_segments(conn):
            delete_segment(conn, Segment("AAPL", "1d", FEB), tz="UTC")


def test_resets_while_the_refill_analyzes_and_swaps_the_copy_each_restore_it(loaded: ServerInfo) -> None:
    """What a reset right after a refresh meets: the detached refill replacing the copy by an analyzed one,
    sweeping the old one's clones and cloning the new one."""
    save_pristine(loaded, pool_size=2)
    for _ in range(3):
        _toggle_february(loaded)
        save_pristine(loaded, fill_pool=False)
        expected = _state(loaded.dsn())
        with ThreadPoolExecutor(1) as beside:
            refilling = beside.submit(refill_pool, loaded)
            while not refilling.done():
                _dirty(loaded)
                restore_pristine(loaded, refill=False)
                assert _state(loaded.dsn()) == expected
            refilling.result()
        refill_pool(loaded)
        assert pool_status(loaded).ready == (pool_name(loaded.dbname, 0), pool_name(loaded.dbname, 1))


def test_pool_databases_an_older_version_left_are_never_handed_out_and_the_refill_replaces_them(
    loaded: ServerInfo,
) -> None:
    """A killed process of an older version left pool slots with its own mark (or none) and another schema. Its
    mark is of another form (a word before ``clone_of``): words after this one's fields are a newer refresher's,
    read as absent (``test_pool_default``), and a clone of the current pristine copy so marked is ready."""
    save_pristine(loaded, pool_size=2)
    expected = _state(loaded.dsn())
    db = loaded.dbname
    with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as admin:
        for name in pool_status(loaded).ready:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        generation = admin.execute(
            "SELECT substring(shobj_description(oid, 'pg_database') FROM 'generation=([0-9a-f]+)') "
            "FROM pg_database WHERE datname = %s",
            (pristine_name(db),),
        ).fetchone()
        assert generation is not None
        for n, note in enumerate([f"refresher schema=1 clone_of={generation[0]}", "refresher clone"]):
            name = pool_name(db, n)
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(db))
            )
            with psycopg.connect(loaded.dsn(name), autocommit=True) as old:
                old.execute("DROP TABLE ohlcv_daily CASCADE")
            admin.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(note))
            )
    assert pool_status(loaded).ready == ()
    _dirty(loaded)
    assert restore_pristine(loaded, refill=False).method == "template"
    assert _state(loaded.dsn()) == expected
    refill_pool(loaded)
    assert pool_status(loaded).ready == (pool_name(db, 0), pool_name(db, 1))
    for n in range(2):
        assert _state(loaded.dsn(pool_name(db, n))) == expected


@pytest.mark.parametrize(
    "held",
    [
        "SELECT count(*) FROM ohlcv_daily",
        "DELETE FROM ohlcv_daily",
        "TRUNCATE ohlcv_daily",
        "TRUNCATE refresher_segments",
        "LOCK TABLE refresher_segments",
    ],
)
def test_a_reset_while_a_client_holds_a_transaction_open_ends_it_and_restores(
    loaded: ServerInfo, held: str
) -> None:
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    with psycopg.connect(loaded.dsn()) as client:
        client.execute(held)  # and the transaction stays open, idle
        done: list[object] = []
        resetting = threading.Thread(target=lambda: done.append(restore_pristine(loaded, refill=False)))
        resetting.daemon = True
        resetting.start()
        resetting.join(30)
        assert done, f"the reset still waits after 30 s behind an open transaction that ran {held!r}"
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
    assert _state(loaded.dsn()) == expected


def test_a_segment_committed_while_the_reset_checks_the_ledger_is_never_lost(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer beside the reset (a jobs worker loads without the profile lock) that committed a segment just after
    the reset read the ledger's stamp lost it: the reset then swapped in the older copy. A writer must either have
    its commit refused or keep its segment (the reset refusing)."""
    save_pristine(loaded, pool_size=1)
    committed: list[bool] = []
    real = snapshot.ledger_stamp

    def write_february() -> None:
        _record_commit(committed, lambda: _toggle_february(loaded))

    def then_a_writer_commits(conn: psycopg.Connection[object], *tables: object) -> str | None:
        stamp = real(conn, *tables)
        writer = threading.Thread(target=write_february)
        writer.start()
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as watch:
            deadline = time.monotonic() + 60
            while True:  # until it committed, or waits for a lock
                waiting = watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (loaded.dbname,),
                ).fetchone()
                if committed or waiting:
                    break
                assert time.monotonic() < deadline, "the writer neither committed nor waited for a lock"
                time.sleep(0.01)
        monkeypatch.setattr(snapshot, "ledger_stamp", real)
        threads.append(writer)
        return stamp

    threads: list[threading.Thread] = []
    monkeypatch.setattr(snapshot, "ledger_stamp", then_a_writer_commits)
    with contextlib.suppress(SnapshotError):  # refused: the ledger moved on
        restore_pristine(loaded, refill=False)
    for thread in threads:
        thread.join(30)
    _kept_if_committed(loaded, committed)


def test_a_segment_committed_while_the_reset_copies_is_never_lost(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no ready clone the reset copies the pristine copy (seconds for a large one) after its check of the
    ledger: a writer committing a segment meanwhile lost it to the copy swapped in. The ledger is read again
    before the swap: the reset refuses, the segment stays."""
    save_pristine(loaded, pool_size=0)
    copied: list[bool] = []
    real = pool._create_from

    def a_writer_commits_after_the_copy(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        if not copied:
            copied.append(True)
            _toggle_february(loaded)

    monkeypatch.setattr(pool, "_create_from", a_writer_commits_after_the_copy)
    with pytest.raises(SnapshotError, match="predates the database's ledger") as refused:
        restore_pristine(loaded, refill=False)
    assert copied and "\n" not in str(refused.value)
    with psycopg.connect(loaded.dsn()) as conn:
        assert Segment("AAPL", "1d", FEB) in read_loaded_segments(conn), "a committed segment was lost"
    # Nothing of the copy is left behind: a plain reset after the snapshot catches up restores February too.
    monkeypatch.setattr(pool, "_create_from", real)
    assert not [name for name in _databases(loaded) if "__pool_" in name]
    save_pristine(loaded, pool_size=0)
    expected = _state(loaded.dsn())
    _dirty(loaded)
    assert restore_pristine(loaded, refill=False).method == "template"
    assert _state(loaded.dsn()) == expected


def test_a_database_dropped_while_the_reset_copies_is_refused_not_taken_for_the_resets_own_drop(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger read again before the swap found no database and let the reset go on: what was committed there
    while it took sessions was unknown. Only this reset's own drop, its door shut since its last read, goes on."""
    save_pristine(loaded, pool_size=0)
    real = pool._create_from

    def dropped_by_hand_meanwhile(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(loaded.dbname)))

    monkeypatch.setattr(pool, "_create_from", dropped_by_hand_meanwhile)
    with pytest.raises(SnapshotError, match="dropped by another session while the reset copied") as refused:
        restore_pristine(loaded, refill=False)
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(pool, "_create_from", real)
    assert not [name for name in _databases(loaded) if "__pool_" in name]
    assert restore_pristine(loaded, refill=False).method == "template"  # no database: the next reset makes it


@pytest.mark.parametrize("pool_size", [1, 0])
def test_a_reset_that_refuses_ends_no_session(loaded: ServerInfo, pool_size: int) -> None:
    """A reset refused because the ledger moved past the pristine copy ended the sessions holding the ledger's
    lock first (a writer mid-transaction lost its work): it ends nobody."""
    save_pristine(loaded, pool_size=pool_size)
    _toggle_february(loaded)  # the ledger moves on: a reset refuses
    with (
        psycopg.connect(loaded.dsn()) as writer,
        psycopg.connect(loaded.dsn(), autocommit=True) as idle,
    ):
        writer.execute("DELETE FROM refresher_segments WHERE false")  # mid-transaction, holding ROW EXCLUSIVE
        with pytest.raises(SnapshotError, match="predates the database's ledger"):
            restore_pristine(loaded, refill=False)
        assert writer.execute("SELECT 1").fetchone() == (1,)
        writer.commit()
        assert idle.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("pool_size", [1, 0])
def test_a_session_connecting_after_the_last_ledger_read_cannot_commit_a_segment_the_reset_throws_away(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch, pool_size: int
) -> None:
    """The reset read the ledger's stamp under its lock and ended every session, then renamed: a session that
    connected in the milliseconds between (a jobs worker loads without the profile lock) committed a segment
    that went to the trash with the old database, the restored one lacking it, while the writer thought it
    loaded. Here a writer connects, commits February and disconnects right before the swap: it must be refused
    (its connection or its commit), or keep February."""
    save_pristine(loaded, pool_size=pool_size)
    _dirty(loaded)  # a developer's dirt: the reset goes on
    committed: list[bool] = []
    real = pool._take

    def a_writer_commits_then_the_swap(conn: psycopg.Connection[object], *args: object, **kw: object) -> None:
        if not committed:  # connects, loads February, commits, disconnects
            _record_commit(committed, lambda: _toggle_february(loaded))
        real(conn, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pool, "_take", a_writer_commits_then_the_swap)
    monkeypatch.setattr(snapshot, "_take", a_writer_commits_then_the_swap)
    with contextlib.suppress(SnapshotError):  # refused: the ledger moved on
        restore_pristine(loaded, refill=False)
    _kept_if_committed(loaded, committed)


@pytest.mark.parametrize("repair", ["reset", "status", "refresh"])
def test_a_reset_killed_with_its_door_shut_leaves_a_database_the_next_command_opens(
    loaded: ServerInfo, repair: str
) -> None:
    """From its last read of the ledger to its swap a reset makes the database refuse new sessions: killed there,
    the next reset, status or refresh (its connection) opens it again, and the data is what it was."""
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    assert not _killed_after(loaded, 1, "snapshot.restore_pristine(server, refill=False)")  # ALTER DATABASE
    assert _refusing(loaded)
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        _state(loaded.dsn())
    if repair == "reset":
        assert restore_pristine(loaded, refill=False).method == "pool"
    elif repair == "status":
        assert pool_status(loaded).pristine
    else:
        with snapshot.connect_working(loaded, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not _refusing(loaded)
    assert _state(loaded.dsn()) == expected


def test_a_reset_stopped_with_its_door_shut_bounds_the_wait_with_one_line(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset stopped (SIGSTOP, Ctrl-Z, a suspended laptop) between shutting the door and its swap holds TAKE:
    connect_working (plan, jobs submit, a worker) waited for it with no limit, silently, and a worker could not be
    stopped. It waits DOOR_WAIT_SECONDS, then one line says a reset holds the database; once TAKE is free, the
    door opens."""
    monkeypatch.setattr(snapshot, "DOOR_WAIT_SECONDS", 0.5)
    # The executor outermost: a connection still waiting when the test gives up goes on once the reset's session
    # has ended, and the executor's exit does not hang.
    with ThreadPoolExecutor(1) as pool_:
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as reset:  # the stopped reset's session
            reset.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (loaded.dbname, snapshot.TAKE))
            reset.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(loaded.dbname)
                )
            )
            waiting = pool_.submit(snapshot.connect_target, loaded, "unused", autocommit=True)
            with pytest.raises(psycopg.OperationalError) as info:
                waiting.result(timeout=30)  # before: still waiting when the test gave up
        line = str(info.value)
        assert (
            "\n" not in line
            and f"database {loaded.dbname} refuses sessions: a reset of this profile holds it" in line
        )
        assert "run `refresher reset` again" in line
    # the reset's session ended (a kill): TAKE is free, and the next connection opens the door
    with snapshot.connect_working(loaded, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not _refusing(loaded)


def test_a_session_starting_when_the_door_shuts_is_ended_before_it_can_commit(loaded: ServerInfo) -> None:
    """A session past the database's check of ALLOW_CONNECTIONS but not yet in pg_stat_activity (its backend still
    starting: here held by post_auth_delay) when the reset shuts the door and ends the sessions was not ended: it
    then committed February, which the swap threw away. The reset waits for such a start, then ends it."""
    save_pristine(loaded, pool_size=1)
    _dirty(loaded)
    committed: list[bool] = []

    def slow_write() -> None:
        with psycopg.connect(loaded.dsn(), autocommit=True, options="-c post_auth_delay=2") as conn:
            load_segment(conn, Segment("AAPL", "1d", FEB), daily_bars("AAPL", FEB, 20), "feb", tz="UTC")

    writer = threading.Thread(target=_record_commit, args=(committed, slow_write))
    writer.start()
    try:
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as watch:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until its backend holds its database's lock, past the check
                starting = watch.execute(
                    "SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.objid WHERE l.locktype = 'object' "
                    "AND l.classid = 'pg_database'::regclass AND d.datname = %s AND l.granted",
                    (loaded.dbname,),
                ).fetchone()
                if starting:
                    break
                time.sleep(0.002)
            assert starting, "the writer's session never started"
        with contextlib.suppress(SnapshotError):  # refused: the ledger moved on
            restore_pristine(loaded, refill=False)
    finally:
        writer.join(30)
    _kept_if_committed(loaded, committed)


def test_a_deadlock_with_a_writer_on_the_ledger_ends_the_writer_and_the_reset_restores(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holding refresher_features, then asking for refresher_segments, beside the reset's lock of both
    (segments first): a real deadlock, which the server reports to the reset (its deadlock_timeout is the shorter).
    It read as 'cannot reach the server for snapshots'; it is a busy lock like a lock timeout: the writer ends
    and the reset restores."""
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute(FEATURES_DDL)
        ensure_ledger_counter(conn, "refresher_features")
    save_pristine(loaded, pool_size=1)
    expected = _state(loaded.dsn())
    _dirty(loaded)
    # The reset's wait for the lock is made longer than its deadlock_timeout, so the server reports the deadlock
    # rather than the lock timeout; the writer's is longer still, so the reset is the one told.
    monkeypatch.setattr(
        snapshot,
        "_LEDGER_LOCK_WAIT",
        f"-c lock_timeout=20s -c deadlock_timeout=1s -c application_name={snapshot._CHECKER}",
    )
    busy: list[type[BaseException]] = []
    real = snapshot._evicting

    def recording(conn: Any, ending: Any, run: Any, *args: Any, **kwargs: Any) -> Any:
        def recorded() -> Any:
            try:
                return run()
            except psycopg.Error as exc:
                busy.append(type(exc))
                raise

        return real(conn, ending, recorded, *args, **kwargs)

    monkeypatch.setattr(snapshot, "_evicting", recording)
    with psycopg.connect(loaded.dsn()) as writer:
        writer.execute("SET deadlock_timeout = '60s'")
        writer.execute("DELETE FROM refresher_features WHERE false")  # ROW EXCLUSIVE on features, held
        row = writer.execute("SELECT 'refresher_features'::regclass::oid").fetchone()
        features = row[0] if row else None
        with ThreadPoolExecutor(1) as pool_:
            resetting = pool_.submit(restore_pristine, loaded, refill=False)
            with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as watch:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # until the reset holds segments and waits for features
                    waiting = watch.execute(
                        "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
                        "AND a.application_name = %s AND l.relation = %s",
                        (snapshot._CHECKER, features),
                    ).fetchone()
                    if waiting:
                        break
                    time.sleep(0.005)
                assert waiting, "the reset never waited for the writer's lock"
            # The deadlock's other side: its statement goes on once the reset's transaction rolled back, or is ended.
            with contextlib.suppress(psycopg.OperationalError):
                writer.execute("DELETE FROM refresher_segments WHERE false")
            assert resetting.result(60).method == "pool"
        with pytest.raises(psycopg.OperationalError):  # ended by the reset's retry
            writer.execute("SELECT 1")
        writer.close()
    assert psycopg.errors.DeadlockDetected in busy, busy
    assert _state(loaded.dsn()) == expected


@pytest.mark.parametrize("pool_size", [1, 0])
def test_a_session_connected_before_an_unlocked_ledger_read_cannot_commit_a_segment_the_reset_throws_away(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch, pool_size: int
) -> None:
    """A reset whose locked read of the ledger falls back (a role that may not LOCK it, or autovacuum holding it
    past the lock wait) shut the door but ended nobody: a session already connected (a jobs worker keeps its
    connection across jobs) committed February before the swap, which threw it away. It is ended with the door
    shut, so its commit is refused, or the reset refuses and February stays."""
    save_pristine(loaded, pool_size=pool_size)
    _dirty(loaded)
    committed: list[bool] = []

    def no_lock(*args: object, **kwargs: object) -> None:
        raise psycopg.errors.LockNotAvailable("the ledger's lock is not available (forced)")

    with psycopg.connect(loaded.dsn(), autocommit=True) as worker:
        worker.execute("SELECT 1")  # connected before the reset, idle between jobs

        def a_worker_commits_then_the_swap(
            conn: psycopg.Connection[object], *args: object, **kw: object
        ) -> None:
            if not committed:
                _record_commit(
                    committed,
                    lambda: load_segment(
                        worker, Segment("AAPL", "1d", FEB), daily_bars("AAPL", FEB, 20), "feb", tz="UTC"
                    ),
                )
            real(conn, *args, **kw)  # type: ignore[arg-type]

        real = pool._take
        monkeypatch.setattr(snapshot, "_evicting", no_lock)
        monkeypatch.setattr(pool, "_take", a_worker_commits_then_the_swap)
        monkeypatch.setattr(snapshot, "_take", a_worker_commits_then_the_swap)
        with contextlib.suppress(SnapshotError):  # refused: the ledger moved on
            restore_pristine(loaded, refill=False)
    _kept_if_committed(loaded, committed)
