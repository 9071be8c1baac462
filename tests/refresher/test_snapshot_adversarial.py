"""The instant reset under attack: kill -9 between any two steps of a reset, a refill or an advance, resets at
once or beside a refill, an older version's pool leftovers, and a client holding a transaction open on the
database."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import sql

from refresher import _snapshot_sql, snapshot
from refresher.database import read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError, SnapshotError
from refresher.load import delete_segment
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
from tests.refresher.test_snapshot_crash import (
    FEB,
    _databases,
    _kill_steps,
    _killed_after,
    _state,
    _toggle_february,
)

pytestmark = pytest.mark.postgres


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
            pytest.fail(f"step {step}: the killed reset left no database ({exc})")
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
    """A killed process of an older version left pool slots with its own mark (or none) and another schema."""
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
        for n, note in enumerate([f"refresher clone_of={generation[0]} schema=1", "refresher clone"]):
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
        try:
            _toggle_february(loaded)
            committed.append(True)
        except (psycopg.OperationalError, LoadError):  # ended by the reset: nothing committed
            committed.append(False)

    def then_a_writer_commits(conn: psycopg.Connection[object], *tables: object) -> str | None:
        stamp = real(conn, *tables)
        writer = threading.Thread(target=write_february)
        writer.start()
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as watch:
            for _ in range(500):  # until it committed, or waits for a lock
                waiting = watch.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                    (loaded.dbname,),
                ).fetchone()
                if committed or waiting:
                    break
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
    assert committed
    with psycopg.connect(loaded.dsn()) as conn:
        has_february = Segment("AAPL", "1d", FEB) in read_loaded_segments(conn)
    assert not committed[0] or has_february, "a committed segment was lost to the reset"


def test_a_segment_committed_while_the_reset_copies_is_never_lost(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no ready clone the reset copies the pristine copy (seconds for a large one) after its check of the
    ledger: a writer committing a segment meanwhile lost it to the copy swapped in. The ledger is read again
    before the swap: the reset refuses, the segment stays."""
    save_pristine(loaded, pool_size=0)
    copied: list[bool] = []

    def a_writer_commits_after_the_copy() -> None:  # the first statement of a copying reset: CREATE DATABASE
        if not copied:
            copied.append(True)
            _toggle_february(loaded)

    monkeypatch.setattr(_snapshot_sql, "_after_statement", a_writer_commits_after_the_copy)
    with pytest.raises(SnapshotError, match="predates the database's ledger") as refused:
        restore_pristine(loaded, refill=False)
    assert copied and "\n" not in str(refused.value)
    with psycopg.connect(loaded.dsn()) as conn:
        assert Segment("AAPL", "1d", FEB) in read_loaded_segments(conn), "a committed segment was lost"
    # Nothing of the copy is left behind: a plain reset after the snapshot catches up restores February too.
    monkeypatch.setattr(_snapshot_sql, "_after_statement", None)
    assert not [name for name in _databases(loaded) if "__pool_" in name]
    save_pristine(loaded, pool_size=0)
    expected = _state(loaded.dsn())
    _dirty(loaded)
    assert restore_pristine(loaded, refill=False).method == "template"
    assert _state(loaded.dsn()) == expected


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
