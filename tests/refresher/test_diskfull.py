"""A full disk under the server, while loading or while copying the snapshot: one line, nothing half-made."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from refresher import pool
from refresher.database import count_rows, ensure_schema, read_loaded_segments
from refresher.diskfull import MB, data_directory
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.errors import DiskFull, SnapshotError
from refresher.load import SEGMENT_LOCK_WAIT, load_segment
from refresher.segments import Segment
from refresher.snapshot import has_pristine, is_current, restore_pristine, save_pristine
from tests.fixtures_postgres import minute_bars, world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_snapshot_adversarial import _kept_if_committed, _record_commit
from tests.refresher.test_snapshot_crash import _toggle_february

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def server_on_a_small_disk() -> Iterator[tuple[ServerInfo, Path]]:
    """A local server whose state dir is a 100 MB tmpfs: about 60 MB left after initdb."""
    path = Path(tempfile.mkdtemp(prefix="refresher-small-", dir="/tmp"))
    command = ["mount", "-t", "tmpfs", "-o", "size=100m,mode=0755", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        path.rmdir()
        pytest.skip("mounting a small tmpfs needs root")
    engine = LocalEngine(path)
    try:
        yield engine.start("small"), path / "local" / "small" / "pgdata"
    finally:
        engine.stop("small")
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def _assert_one_line_naming(error: DiskFull, pgdata: Path) -> None:
    """One line naming the local server's data directory and its free space as this host measures it (the
    server's own df would say "has less than"; its failed statement, "is full")."""
    message = str(error)
    assert "\n" not in message and error.exit_code == 2
    free = error.fields["free"]
    assert isinstance(free, int), message
    assert message.startswith(f"disk full: {pgdata} has {free / MB:,.0f} MB free, "), message
    assert " needs about " in message, message


def test_a_full_disk_is_one_line_and_leaves_every_segment_whole_and_the_old_snapshot(
    server_on_a_small_disk: tuple[ServerInfo, Path],
) -> None:
    server, pgdata = server_on_a_small_disk
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        # This host sees the server's own cluster there (its pg_control carries the server's system identifier).
        assert data_directory(conn) == pgdata
        ensure_schema(conn)
        first = Segment("S0", "1m", dt.date(2024, 1, 1))
        load_segment(
            conn, first, minute_bars("S0", dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC), 20_000), "h", tz="UTC"
        )
    save_pristine(server, pool_size=0)  # terminates the sessions on the database: connect again
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        with pytest.raises(DiskFull) as loading:
            for i in range(1, 40):
                segment = Segment(f"S{i}", "1m", dt.date(2024, 1, 1))
                bars = minute_bars(f"S{i}", dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC), 40_000)
                load_segment(conn, segment, bars, "h", tz="UTC")
        _assert_one_line_naming(loading.value, pgdata)
        assert "loading S" in str(loading.value)
        ledger = read_loaded_segments(conn)
        assert {s: r.rows for s, r in ledger.items()} == count_rows(
            conn, list(ledger), timezones="UTC", wait=SEGMENT_LOCK_WAIT
        )

    with pytest.raises(DiskFull) as copying:
        save_pristine(server, pool_size=0)
    _assert_one_line_naming(copying.value, pgdata)
    assert "for the snapshot" in str(copying.value)
    # The replacement failed before its swap: the previous snapshot is still whole, and known to be stale.
    assert has_pristine(server) and not is_current(server)
    with psycopg.connect(server.dsn("postgres")) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [name for name in names if "__building_" in name]


def test_a_full_feature_store_is_one_line_naming_it_and_its_free_space(tmp_path: Path) -> None:
    store = Path(tempfile.mkdtemp(prefix="refresher-small-store-", dir="/tmp"))
    command = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(store)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        store.rmdir()
        pytest.skip("mounting a small tmpfs needs root")
    ws = Workspace(world_traversable_tmp("refresher-storefull-"), "local", "storefull")
    ws.write_profile(symbols=[f"S{i:02d}" for i in range(12)], months=3)
    env = {**ws.env, "FEATURE_STORE_PATH": str(store / "store")}
    try:
        done = subprocess.run(
            ws.command("refresh", "--profile", ws.profile),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        ws.down()
        subprocess.run(["umount", "-l", str(store)], check=False)
        store.rmdir()
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"refresher: disk full: {store / 'store'} has "), done.stderr


def _load_and_save(server: ServerInfo, *, symbols: int) -> None:
    """25,000 minute bars of each of ``symbols`` symbols, then the pristine copy, with no pool."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        for i in range(symbols):
            segment = Segment(f"S{i}", "1m", dt.date(2024, 1, 1))
            bars = minute_bars(f"S{i}", dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC), 25_000)
            load_segment(conn, segment, bars, "h", tz="UTC")
    save_pristine(server, pool_size=0)


def _room_for_one_copy(server: ServerInfo, pgdata: Path) -> Path:
    """Five symbols saved, S0's rows deleted (the reset restores): less free than a copy needs, more than it needs
    once the replaced database's disk is given back. The file filling the disk."""
    _load_and_save(server, symbols=5)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'S0'")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert size is not None
    free = shutil.disk_usage(pgdata).free
    filler = pgdata.parents[2] / "filler"
    filler.write_bytes(b"\0" * (free - size[0] // 2))
    return filler


def test_a_reset_on_a_disk_with_room_for_one_copy_drops_what_it_replaces_first(
    server_on_a_small_disk: tuple[ServerInfo, Path],
) -> None:
    """No pool: a reset copies the pristine copy while the database it replaces still holds its disk. With room
    for that copy only once that database is gone, the reset resets."""
    server, pgdata = server_on_a_small_disk
    filler = _room_for_one_copy(server, pgdata)
    assert restore_pristine(server, refill=False).method == "template"
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min WHERE symbol = 'S0'").fetchone() == (25_000,)
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [name for name in names if "__trash_" in name or "__pool_" in name]
    # With no room even then (the database dropped by hand: nothing to give back): one line, saying what for.
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(server.dbname)))
    filler.unlink()
    filler.write_bytes(b"\0" * (shutil.disk_usage(pgdata).free - 2 * 2**20))
    with pytest.raises(DiskFull) as resetting:
        restore_pristine(server, refill=False)
    _assert_one_line_naming(resetting.value, pgdata)
    assert f"resetting {server.dbname} (a copy of {server.dbname}__pristine)" in str(resetting.value)


def test_a_segment_committed_while_a_reset_makes_room_for_its_copy_is_never_lost(
    server_on_a_small_disk: tuple[ServerInfo, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pool, room for one copy: the database took sessions while the first copy failed (seconds for a large
    one), and a writer committing a segment then lost it when the reset dropped the database for room, the
    reset reporting success. The writer keeps its segment, or the reset refuses in one line."""
    server, pgdata = server_on_a_small_disk
    filler = _room_for_one_copy(server, pgdata)
    committed: list[bool] = []
    real = pool._create_from

    def a_writer_commits_after_a_full_disk(*args: Any, **kwargs: Any) -> None:
        try:
            real(*args, **kwargs)
        except DiskFull:
            if not committed:  # room for its WAL: another process's file goes
                os.truncate(filler, filler.stat().st_size - 20 * 2**20)
                _record_commit(committed, lambda: _toggle_february(server))
            raise

    monkeypatch.setattr(pool, "_create_from", a_writer_commits_after_a_full_disk)
    with pytest.raises(SnapshotError, match="predates the database's ledger") as refused:
        restore_pristine(server, refill=False)
    assert committed == [True] and "\n" not in str(refused.value)
    _kept_if_committed(server, committed)


def test_a_reset_that_does_not_fit_even_without_the_database_leaves_it_as_it_was(
    server_on_a_small_disk: tuple[ServerInfo, Path],
) -> None:
    """No pool, and no room for the copy even with the database it replaces gone: dropping it left no database
    at all until the next reset or refresh. It stays, as the user left it, and the error says so."""
    server, pgdata = server_on_a_small_disk
    _load_and_save(server, symbols=3)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("TRUNCATE ohlcv_1min")  # its disk is given back: dropping it now gives back little
    filler = pgdata.parents[2] / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(pgdata).free - 2 * 2**20))
    with pytest.raises(DiskFull) as resetting:
        restore_pristine(server, refill=False)
    _assert_one_line_naming(resetting.value, pgdata)
    assert str(resetting.value).endswith(f"({server.dbname} is left as it was, not reset)")
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == (0,)
    filler.unlink()
    assert restore_pristine(server, refill=False).method == "template"
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == (75_000,)
