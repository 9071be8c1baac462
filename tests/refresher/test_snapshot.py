"""Pristine snapshots, the warm clone pool and resets, on a real server."""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from refresher.database import read_loaded_segments
from refresher.engines.base import ServerInfo
from refresher.errors import SnapshotError
from refresher.segments import Segment
from refresher.snapshot import (
    checkout_clone,
    drop_clone,
    has_pristine,
    pool_status,
    pristine_name,
    restore_pristine,
    save_pristine,
    wait_for_pool,
)

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
    assert "refill" in (tmp_path / "refill.log").read_text()
    assert not any("__trash_" in name for name in _databases(loaded))


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


def test_the_refill_copies_at_low_priority(loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    from refresher import snapshot

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

        monkeypatch.setattr(snapshot, "_after_statement", note_refiller_priority)
        assert snapshot.refill_pool(loaded) == 2
        # The server's other processes keep the priority the server started with (this run's, maybe niced).
        normal = os.getpriority(os.PRIO_PROCESS, observer.info.backend_pid)
    assert seen and min(seen) == min(normal + 10, 19) > normal
    assert len(pool_status(loaded).ready) == 2
