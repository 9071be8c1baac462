"""Pristine snapshots, the warm clone pool and resets, on a real server."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import psycopg
import pytest

from refresher.database import read_loaded_segments
from refresher.diskfull import COPY_SLACK
from refresher.engines.base import ServerInfo
from refresher.errors import SnapshotError
from refresher.pool import (
    checkout_clone,
    drop_clone,
    pool_name,
    pool_status,
    refill_pool,
    resize_pool,
    wait_for_pool,
)
from refresher.segments import Segment
from refresher.snapshot import has_pristine, pristine_name, restore_pristine, save_pristine

pytestmark = pytest.mark.postgres
JAN = dt.date(2024, 1, 1)


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()
        assert row is not None
        return int(row[0])


def _databases(server: ServerInfo) -> set[str]:
    with psycopg.connect(server.dsn("postgres")) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}


def test_without_a_pristine_snapshot_reset_says_to_refresh_first(loaded: ServerInfo) -> None:
    with pytest.raises(SnapshotError, match="refresher refresh"):
        restore_pristine(loaded)
    with pytest.raises(SnapshotError, match="refresher refresh"):
        checkout_clone(loaded, f"{loaded.dbname}_c")


def test_save_makes_a_template_and_a_full_pool(loaded: ServerInfo) -> None:
    assert not has_pristine(loaded)
    info = save_pristine(loaded, pool_size=3)
    assert has_pristine(loaded)
    assert info.pristine == pristine_name(loaded.dbname) and len(info.pool) == 3
    assert set(info.pool) | {info.pristine} <= _databases(loaded)
    with psycopg.connect(loaded.dsn("postgres")) as conn:
        row = conn.execute(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = %s", (info.pristine,)
        ).fetchone()
    assert row == (True, False)
    status = pool_status(loaded)
    assert status.pristine and status.target == 3 and status.ready == info.pool


def test_reset_undoes_deletes_and_dropped_tables_and_refills_in_the_background(
    loaded: ServerInfo, tmp_path: Path
) -> None:
    save_pristine(loaded, pool_size=2)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE date > '2024-01-10'")
        conn.execute("DROP TABLE refresher_segments")
        still_open = psycopg.connect(loaded.dsn())  # reset must not wait for sessions to go away
    try:
        report = restore_pristine(loaded, refill_log=tmp_path / "refill.log")
    finally:
        still_open.close()
    assert report.method == "pool"
    assert _count(loaded.dsn()) == 21
    with psycopg.connect(loaded.dsn()) as conn:
        assert list(read_loaded_segments(conn)) == [Segment("AAPL", "1d", JAN)]
    # Nobody in this process refills: only the detached refiller can bring the pool back to two.
    assert len(wait_for_pool(loaded, timeout=120).ready) == 2
    # The refiller prints its line after its session ends, just after it marked the last clone ready.
    log = tmp_path / "refill.log"
    deadline = time.monotonic() + 30
    while "refill" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refill" in log.read_text()
    assert not any("__trash_" in name for name in _databases(loaded))


def test_a_refill_that_cannot_start_is_one_line_not_the_resets_failure(
    loaded: ServerInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_pristine(loaded, pool_size=1)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    unwritable = tmp_path / "gone" / "refill.log"  # its directory does not exist: the spawn fails for real
    report = restore_pristine(loaded, refill_log=unwritable)
    assert report.method == "pool"
    assert _count(loaded.dsn()) == 21
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the pool's refill did not start" in err[0] and str(unwritable) in err[0]
    refill_pool(loaded)  # the next refresh's refill fills it
    assert len(pool_status(loaded).ready) == 1


def test_reset_falls_back_to_the_template_when_the_pool_is_empty(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=0)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    report = restore_pristine(loaded, refill=False)
    assert report.method == "template"
    assert report.to_json()["method"] == "template"
    assert _count(loaded.dsn()) == 21


def test_checkout_clone_gives_independent_databases(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    first = checkout_clone(loaded, f"{loaded.dbname}_a", refill=False)  # from the pool
    second = checkout_clone(loaded, f"{loaded.dbname}_b", refill=False)  # pool empty: from the template
    try:
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute("DELETE FROM ohlcv_daily")
        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            conn.execute("DELETE FROM ohlcv_daily WHERE date < '2024-01-05'")
        assert (_count(first), _count(second), _count(loaded.dsn())) == (0, 21, 17)
    finally:
        drop_clone(loaded, f"{loaded.dbname}_a")
        drop_clone(loaded, f"{loaded.dbname}_b")
    assert not {f"{loaded.dbname}_a", f"{loaded.dbname}_b"} & _databases(loaded)


def test_concurrent_checkouts_never_share_a_clone(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=2)
    names = [f"{loaded.dbname}_w{i}" for i in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            dsns = list(pool.map(lambda name: checkout_clone(loaded, name, refill=False), names))
        assert set(names) <= _databases(loaded)
        assert [_count(dsn) for dsn in dsns] == [21] * 4
        assert pool_status(loaded).ready == ()
    finally:
        for name in names:
            drop_clone(loaded, name)


def test_drop_clone_refuses_the_working_and_pristine_databases(loaded: ServerInfo) -> None:
    for name in (loaded.dbname, pristine_name(loaded.dbname)):
        with pytest.raises(SnapshotError, match="not a clone"):
            drop_clone(loaded, name)


def test_a_new_pristine_replaces_the_old_pool(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE date > '2024-01-15'")
    save_pristine(loaded, pool_size=1)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    assert restore_pristine(loaded, refill=False).method == "pool"
    assert _count(loaded.dsn()) == 15


def test_a_background_save_leaves_the_old_copies_to_the_refill_and_never_hands_them_out(
    loaded: ServerInfo,
) -> None:
    from refresher import pool

    save_pristine(loaded, pool_size=2)
    old_clones = set(pool_status(loaded).ready)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE date > '2024-01-15'")
    # A refresh's save: the replaced copy (now trash) and its clones are still there when it returns...
    save_pristine(loaded, pool_size=2, fill_pool=False)
    left = _databases(loaded)
    assert old_clones <= left and any("__trash_" in name for name in left)
    # ...but no reset takes one: they are clones of the replaced copy.
    assert pool_status(loaded).ready == ()
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    assert restore_pristine(loaded, refill=False).method == "template"
    assert _count(loaded.dsn()) == 15
    # The refill drops them, then makes the new clones.
    assert pool.refill_pool(loaded) == 2
    left = _databases(loaded)
    assert not any("__trash_" in name for name in left)
    assert {name for name in left if "__pool_" in name} == set(pool_status(loaded).ready)
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_daily")
    assert restore_pristine(loaded, refill=False).method == "pool"
    assert _count(loaded.dsn()) == 15


def test_the_refill_copies_at_low_priority(loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from refresher import _snapshot_sql, pool

    save_pristine(loaded, pool_size=2, fill_pool=False)
    seen: list[int] = []
    with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as observer:

        def note_refiller_priority() -> None:
            # After each statement the refill's session is still open: its server process is the one copying.
            rows = observer.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'postgres' AND backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
            seen.extend(os.getpriority(os.PRIO_PROCESS, r[0]) for r in rows)

        monkeypatch.setattr(_snapshot_sql, "_after_statement", note_refiller_priority)
        assert pool.refill_pool(loaded) == 2
        # The server's other processes keep the priority the server started with (this run's, maybe niced).
        normal = os.getpriority(os.PRIO_PROCESS, observer.info.backend_pid)
    assert seen and min(seen) == min(normal + 10, 19) > normal
    assert len(pool_status(loaded).ready) == 2


def test_the_pool_keeps_what_the_disk_holds_past_its_reserve_and_none_past_it() -> None:
    from refresher.pool import GB, pool_size_for_disk

    total, clone = 100 * GB, 2 * GB  # reserve: a tenth of the filesystem, 10 GB
    assert pool_size_for_disk(6, ready=0, clone_bytes=clone, free=50 * GB, total=total) == 6
    # 15 GB free: 5 GB past the reserve holds two more 2 GB clones (each plus a WAL segment).
    assert pool_size_for_disk(6, ready=0, clone_bytes=clone, free=15 * GB, total=total) == 2
    assert pool_size_for_disk(6, ready=3, clone_bytes=clone, free=15 * GB, total=total) == 5
    assert pool_size_for_disk(6, ready=0, clone_bytes=clone, free=5 * GB, total=total) == 0  # no floor
    assert pool_size_for_disk(6, ready=4, clone_bytes=clone, free=GB, total=total) == 4  # none dropped
    # A small filesystem keeps at least 1 GB free.
    assert pool_size_for_disk(6, ready=0, clone_bytes=GB // 2, free=2 * GB, total=4 * GB) == 1
    assert pool_size_for_disk(0, ready=0, clone_bytes=clone, free=50 * GB, total=total) == 0  # chosen: none
    assert pool_size_for_disk(1, ready=0, clone_bytes=clone, free=GB, total=total) == 0


def test_refill_concurrency_follows_the_cores_and_the_disk() -> None:
    from refresher.pool import MAX_REFILL_CONCURRENCY, refill_concurrency

    assert refill_concurrency(1, rotational=False) == 1
    assert refill_concurrency(2, rotational=False) == 2
    assert refill_concurrency(64, rotational=False) == MAX_REFILL_CONCURRENCY
    assert refill_concurrency(2, rotational=True) == 1
    assert refill_concurrency(8, rotational=True) == MAX_REFILL_CONCURRENCY // 2


def test_a_full_disk_shrinks_the_pool_the_refill_makes(
    loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refresher import pool

    save_pristine(loaded, pool_size=4, fill_pool=False)
    with psycopg.connect(loaded.dsn("postgres")) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (pristine_name(loaded.dbname),)).fetchone()
        assert row is not None
    each = int(row[0]) + COPY_SLACK
    # The server's disk as this host sees it: 4 GB, with room past the 1 GB reserve for one clone and a half
    # before the refill; each clone made takes its share.
    free = pool.GB + each * 3 // 2

    def usage(self: object) -> tuple[int, int]:  # not through pool_status: it asks the disk too
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as conn:
            return free - each * len(pool._ready_clones(conn, loaded.dbname)), 4 * pool.GB

    monkeypatch.setattr(pool._Machine, "usage", usage)
    monkeypatch.setattr(pool, "data_directory", lambda conn: Path("/"))
    assert pool.refill_pool(loaded) == 1
    assert len(pool_status(loaded).ready) == 1


def test_refills_of_different_slots_run_at_once(loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two refillers (two xdist workers) asking at once get two slots copied at the same time instead of
    queueing on one lock (the first may make both, from two sessions, before the second looks)."""
    from refresher import pool as clone_pool

    save_pristine(loaded, pool_size=2, fill_pool=False)
    both_copying = threading.Barrier(2, timeout=60)
    make_clone = clone_pool._make_clone

    def meet_then_make(conn: psycopg.Connection[object], db: str, n: int, *rest: object) -> str:
        both_copying.wait()  # broken (an error) unless the other refiller reaches its copy meanwhile
        return make_clone(conn, db, n, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(clone_pool, "_make_clone", meet_then_make)
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda _: clone_pool.refill_pool(loaded, concurrency=2), range(2)))
    assert sum(made) == 2
    assert pool_status(loaded).ready == (
        clone_pool.pool_name(loaded.dbname, 0),
        clone_pool.pool_name(loaded.dbname, 1),
    )


def test_two_takers_racing_for_the_last_clone_get_different_databases(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=1)
    start = threading.Barrier(2, timeout=60)
    names = [f"{loaded.dbname}_r{i}" for i in range(2)]

    def take(name: str) -> str:
        start.wait()
        return checkout_clone(loaded, name, refill=False)

    try:
        for _ in range(5):
            with ThreadPoolExecutor(2) as pool:
                dsns = list(pool.map(take, names))
            oids = set()
            for dsn in dsns:
                with psycopg.connect(dsn) as conn:
                    row = conn.execute(
                        "SELECT oid FROM pg_database WHERE datname = current_database()"
                    ).fetchone()
                    assert row is not None
                    oids.add(row[0])
                    conn.execute("DELETE FROM ohlcv_daily")  # private: the other taker must not see it
                    conn.commit()
            assert len(oids) == 2
            assert [_count(dsn) for dsn in dsns] == [0, 0]
            assert [n for n in _databases(loaded) if "__pool_" in n] == []  # the copy was renamed whole
            for name in names:
                drop_clone(loaded, name)
            assert refill_pool(loaded) == 1
    finally:
        for name in names:
            drop_clone(loaded, name)


_KILL_MID_CHECKOUT = """
import json, os, signal, sys
from refresher import _snapshot_sql, pool
from refresher.engines.base import ServerInfo
server = ServerInfo(**json.loads(sys.stdin.read()))
def after_statement():
    os.kill(os.getpid(), signal.SIGKILL)  # right after the copy, before its rename
_snapshot_sql._after_statement = after_statement
pool.checkout_clone(server, server.dbname + "_killed", refill=False)
"""


def test_a_checkout_killed_mid_copy_leaves_a_slot_the_next_refill_drops(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=0)  # empty pool: the checkout copies the template itself
    done = subprocess.run(
        [sys.executable, "-c", _KILL_MID_CHECKOUT], input=json.dumps(asdict(loaded)), text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    left = {n for n in _databases(loaded) if n.startswith(loaded.dbname + "__pool_")}
    assert len(left) == 1 and f"{loaded.dbname}_killed" not in _databases(loaded)
    assert refill_pool(loaded) == 0
    assert not left & _databases(loaded)


def _copies(server: ServerInfo) -> set[str]:
    """Every database of ``server.dbname`` but itself: the pristine copy, pool slots, trash, half-built ones."""
    return {name for name in _databases(server) if name.startswith(f"{server.dbname}__")}


def _pool(server: ServerInfo, size: int) -> set[str]:
    return {pristine_name(server.dbname), *(pool_name(server.dbname, n) for n in range(size))}


def test_a_pool_of_zero_keeps_no_clone_and_reset_copies_the_pristine_database(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=0)
    assert refill_pool(loaded) == 0
    assert _copies(loaded) == {pristine_name(loaded.dbname)}
    status = pool_status(loaded)
    assert (status.target, status.ready, status.reset) == (0, (), "copy")
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE date > '2024-01-10'")
    report = restore_pristine(loaded, refill=False)
    assert report.method == "template"
    assert _count(loaded.dsn()) == 21
    refill_pool(loaded)  # drops the reset's trash, makes nothing
    assert _copies(loaded) == {pristine_name(loaded.dbname)}


def test_resizing_a_current_snapshot_drops_and_makes_clones_and_the_mark_follows(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=2)
    assert _copies(loaded) == _pool(loaded, 2)
    generation = _mark(loaded).split("generation=")[1]
    for size in (0, 1, 3, 1):
        assert resize_pool(loaded, size)
        assert pool_status(loaded).target == size
        assert f"pool_size={size} " in _mark(loaded)
        assert len(pool_status(loaded).ready) <= size  # dropped before the call returns: disk given back
        refill_pool(loaded)
        assert _copies(loaded) == _pool(loaded, size), size
        assert len(wait_for_pool(loaded, timeout=10).ready) == size
    assert not resize_pool(loaded, 1)  # the mark says so already
    assert _mark(loaded).endswith(f"generation={generation}")  # the same copy: its clones stay valid
    assert restore_pristine(loaded, refill=False).method == "pool"


def _mark(server: ServerInfo) -> str:
    with psycopg.connect(server.dsn("postgres")) as conn:
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (pristine_name(server.dbname),),
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_resizes_and_refills_at_once_never_leave_more_clones_than_the_mark_says(loaded: ServerInfo) -> None:
    """Two refreshes asking for different sizes while refillers run: whichever mark wins, no clone it does not
    count (disk it would lie about), and the next refill brings the pool to exactly what it says."""
    save_pristine(loaded, pool_size=2)
    actions: list[Callable[[], object]] = [
        lambda: resize_pool(loaded, 0),
        lambda: resize_pool(loaded, 2),
        lambda: refill_pool(loaded),
        lambda: refill_pool(loaded),
    ]
    for _ in range(3):
        barrier = threading.Barrier(len(actions))

        def together(action: Callable[[], object], barrier: threading.Barrier = barrier) -> object:
            barrier.wait()
            return action()

        with ThreadPoolExecutor(len(actions)) as pool:
            for future in [pool.submit(together, action) for action in actions]:
                future.result(timeout=120)
        status = pool_status(loaded)
        assert status.target in (0, 2)
        assert len(status.ready) <= status.target
        refill_pool(loaded)
        assert _copies(loaded) == _pool(loaded, pool_status(loaded).target)
