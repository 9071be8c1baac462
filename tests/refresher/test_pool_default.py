"""The pool a user who chose no size gets: none on a filesystem without reflinks when a copy of the database
resets well under a second (predicted from the snapshot's own copy), else the pool as before; a size the user
gives wins and sticks; on XFS with reflink the pool stays. Against real local servers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from refresher._pytest_share import pool_size_for_workers
from refresher._snapshot_sql import _CLONE_MARK, PoolSizing, _Mark, _mark_of
from refresher.diskfull import COPY_SLACK
from refresher.engines.base import ServerInfo
from refresher.pool import (
    PoolStatus,
    _settled,
    _settled_path,
    default_pool_size,
    disk_reserve,
    pool_status,
    refill_pool,
    resize_pool,
    server_reflinks,
    size_pool_rate,
    wait_for_pool,
)
from refresher.settings import AUTO_POOL, DEFAULT_POOL_SIZE, FAST_COPY, parse_pool_size, pool_as_asked
from refresher.snapshot import SnapshotInfo, pristine_name, restore_pristine, save_pristine
from tests.fixtures_postgres import refills_gone, world_traversable_tmp
from tests.refresher.test_cli_stamp import (
    pool_databases,
    refresh_saying,
    stamp_file,
    stamped,
    wait_for_pool_databases,
)
from tests.refresher.test_profile_lock import workspace
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_snapshot import _mark
from tests.refresher.test_snapshot_crash import _killed_after

__all__ = ["workspace"]  # a fixture, imported to be found

LEDGER, GENERATION = "a" * 64, "0123456789abcdef"


def test_the_mark_says_whose_size_it_is_and_an_old_mark_keeps_a_size_other_than_the_old_default() -> None:
    sizings = (PoolSizing(0, False, False, 123), PoolSizing(2, False, True), PoolSizing(3, True, False))
    for pool in (*sizings, PoolSizing(3, True)):
        mark = _Mark(pool, LEDGER, "none", GENERATION)
        assert _mark_of((True, mark.text())) == mark
    old = f"refresher pool_size={{}} ledger={LEDGER} stamp=none generation={GENERATION}"
    # What an older refresher wrote: its default (2) was nobody's choice, any other size was the user's; and
    # whether the copies are reflinks it did not say (None: the refill probes).
    assert _mark_of((True, old.format(2))) == _Mark(PoolSizing(2, False), LEDGER, "none", GENERATION)
    assert _mark_of((True, old.format(0))) == _Mark(PoolSizing(0, True), LEDGER, "none", GENERATION)
    chosen = old.format(3).replace(" ledger=", " chosen ledger=")
    assert _mark_of((True, chosen)) == _Mark(PoolSizing(3, True, None), LEDGER, "none", GENERATION)


def test_a_mark_with_words_a_newer_refresher_adds_is_read_without_them() -> None:
    """An older refresher could not read the mark f82876e wrote (' reflink'): it took the pristine copy for none
    and made it again from scratch. This one reads a word it does not know, after the pool's or at the end, as
    absent; so does a clone's mark."""
    mark = _Mark(PoolSizing(3, True, True, 123), LEDGER, "none", GENERATION, analyzed=True)
    text = mark.text()
    in_the_pool = text.replace(" ledger=", " fast=1 ledger=")
    for newer in (f"{text} newer=1", f"{text} newer", in_the_pool, f"{in_the_pool} x=y z"):
        assert _mark_of((True, newer)) == mark, newer  # fails before: None
    pending = _Mark(PoolSizing(2, False), LEDGER, "none", GENERATION, pending=("bars_1d", "bars_1m"))
    assert _mark_of((True, f"{pending.text()} newer=1")) == pending
    assert _mark_of((False, f"{text} newer=1")) is None  # not a template: half made, as before
    assert _mark_of((True, text.replace(" ledger=", " ledger=x"))) is None  # a known word garbled: no mark
    clone = _CLONE_MARK.match(f"refresher clone_of={GENERATION} newer=1")
    assert clone is not None and clone.group(1) == GENERATION  # fails before: not a ready clone


def test_a_mark_with_a_known_field_garbled_after_a_newer_word_or_at_the_end_is_no_mark() -> None:
    """A word that starts with one of the mark's field names is that field garbled, not a newer one: the mark is
    still none (28003fb read an empty ' pending=' at the end as a newer word: a copy whose stale tables were
    pending taken for one with none pending). So is a clone's mark."""
    mark = _Mark(PoolSizing(3, True, True, 123), LEDGER, "none", GENERATION)
    text = mark.text()
    assert _mark_of((True, f"{text} newer=1")) == mark  # the newer word alone: read
    for garbled in (" pending=", " pending=Odd-Name", " pending", " analyzed=1", " analyzedx", " stamp=none"):
        for tail in (garbled, f" newer=1{garbled}", f" pending=bars_1d{garbled}", f" analyzed{garbled}"):
            assert _mark_of((True, text + tail)) is None, tail  # each fails before
    in_the_pool = text.replace(" ledger=", " newer=1 copy_bps= ledger=")
    for garbled in (
        in_the_pool,
        text.replace(" ledger=", " copy_bps=x ledger="),
        text.replace(" reflink", " reflinks"),
    ):
        assert _mark_of((True, garbled)) is None, garbled  # each fails before
    assert _CLONE_MARK.match(f"refresher clone_of={GENERATION} newer=1") is not None
    for tail in (" clone_of=", f" newer=1 clone_of={GENERATION}", " clone_of=x"):
        assert _CLONE_MARK.match(f"refresher clone_of={GENERATION}{tail}") is None, tail  # each fails before


def test_a_settled_record_with_a_field_a_newer_refresher_adds_is_read(
    pg_database: ServerInfo, tmp_path: Path
) -> None:
    db = pg_database.dbname
    mark = _Mark(PoolSizing(2, False), LEDGER, "none", GENERATION)
    with psycopg.connect(pg_database.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} IS_TEMPLATE true").format(sql.Identifier(pristine_name(db))))
        try:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(pristine_name(db)), sql.Literal(mark.text())
                )
            )
            _settled_path(tmp_path, db).write_text(f"{GENERATION} 2 1\n")
            assert _settled(conn, db, tmp_path) == 1
            _settled_path(tmp_path, db).write_text(f"{GENERATION} 2 1 newer=3\n")
            assert _settled(conn, db, tmp_path) == 1  # fails before: None (the wait asks the full pool)
            # Its fields are by place: one garbled, missing, or moved after a newer word is still no record.
            for garbled in ("2 1x newer=3", "2", "newer=3 2 1", "2 newer=3 1"):
                _settled_path(tmp_path, db).write_text(f"{GENERATION} {garbled}\n")
                assert _settled(conn, db, tmp_path) is None, garbled
        finally:
            conn.execute(
                sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(pristine_name(db)))
            )
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(pristine_name(db))))


def test_the_default_keeps_no_clone_only_without_reflink_and_with_a_fast_copy() -> None:
    gb = 2**30
    fast = int(gb / FAST_COPY) + 1  # bytes per second: a GB in FAST_COPY s
    assert default_pool_size(reflink=False, copy_bps=fast, database_bytes=gb) == 0
    assert default_pool_size(reflink=False, copy_bps=fast, database_bytes=2 * gb) == DEFAULT_POOL_SIZE
    assert default_pool_size(reflink=True, copy_bps=fast, database_bytes=gb) == DEFAULT_POOL_SIZE
    assert default_pool_size(reflink=False, copy_bps=None, database_bytes=gb) == DEFAULT_POOL_SIZE


def _database_bytes(server: ServerInfo, name: str) -> int:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def _seed_rate(server: ServerInfo, bps: int) -> None:
    """Record ``bps`` as the fastest copy measured on ``server`` (the pristine copy's mark), as a quiet moment
    would have: a snapshot keeps the fastest rate seen, so its decision no longer hangs on this machine's load."""
    mark = re.sub(r" copy_bps=\d+", "", _mark(server)).replace(" ledger=", f" copy_bps={bps} ledger=", 1)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(pristine_name(server.dbname)), sql.Literal(mark)
            )
        )


def _snapshot_until_fast(server: ServerInfo) -> SnapshotInfo:
    """``save_pristine`` given no size, on a server where a fast copy was once measured: on a machine other work
    loads even a small database's copy can take over FAST_COPY s, and the fastest rate seen is what counts."""
    save_pristine(server)
    _seed_rate(server, 2**40)
    info = save_pristine(server)
    assert info.sizing.copy_bps == 2**40, _mark(server)  # a copy timed slower does not replace it
    assert info.sizing.size == 0, info
    return info


def test_a_slow_copy_does_not_replace_the_fastest_rate_measured() -> None:
    """One copy timed under load flipped the default pool from 0 to 2 clones and back (and a daily refresh,
    which times no copy, kept the slow rate for good): the mark keeps the fastest rate seen."""
    fast = PoolSizing(0, False, False, copy_bps=10**9)
    assert size_pool_rate(10**6, fast) == 10**9
    assert size_pool_rate(10**10, fast) == 10**10
    assert size_pool_rate(None, fast) == 10**9
    assert size_pool_rate(10**6, None) == 10**6
    assert size_pool_rate(None, None) is None


@pytest.mark.postgres
def test_a_snapshot_without_a_size_on_ext4_keeps_no_clone_and_a_reset_copies(loaded: ServerInfo) -> None:
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        assert not server_reflinks(conn)  # the session server's data directory is on ext4 (no reflink)
        before = conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()
    info = _snapshot_until_fast(loaded)
    assert (info.sizing.size, info.sizing.chosen, info.sizing.reflink) == (0, False, False), _mark(loaded)
    assert info.pool == () and " auto noreflink copy_bps=" in _mark(loaded)
    status = pool_status(loaded)
    assert (status.target, status.ready) == (0, ())
    assert status.why.startswith("pool 0: no reflink here and a copy resets in 0.")
    refill_pool(loaded)
    with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as conn:
        pools = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE '%\\_\\_pool\\_%'"
        ).fetchall()
    assert pools == []
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily")
    assert restore_pristine(loaded, refill=False).method == "template"
    with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone() == before
    # A size given wins, and sticks through a later snapshot that is given none.
    assert save_pristine(loaded, pool_size=2).pool == (f"{loaded.dbname}__pool_0", f"{loaded.dbname}__pool_1")
    again = save_pristine(loaded, fill_pool=False)
    assert (again.sizing.size, again.sizing.chosen) == (2, True)
    assert pool_status(loaded).why.startswith("pool 2: chosen")


@pytest.mark.postgres
def test_a_snapshot_killed_anywhere_while_the_default_drops_an_old_pool_leaves_a_consistent_one(
    loaded: ServerInfo,
) -> None:
    """A server an older refresher snapshotted with its default pool of 2 (nobody's choice): the next snapshot
    given no size keeps none. Killed after any of its statements, the pool is the old one or the new one."""
    save_pristine(loaded, pool_size=2)
    step = 0
    while True:
        step += 1
        with psycopg.connect(loaded.dsn("postgres"), autocommit=True) as conn:
            old = re.sub(
                r" chosen( noreflink)?( copy_bps=\d+)?", "", _mark(loaded)
            )  # as an older refresher wrote it
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(pristine_name(loaded.dbname)), sql.Literal(old)
                )
            )
        refill_pool(loaded)
        assert len(pool_status(loaded).ready) == 2
        done = _killed_after(loaded, step, "snapshot.save_pristine(server, fill_pool=False)")
        status = pool_status(loaded)
        assert status.pristine and status.target in (0, 2), status
        if status.target == 2:
            assert not status.why.startswith("pool 2: chosen"), status  # the old mark, not anybody's choice
        refill_pool(loaded)
        status = pool_status(loaded)
        assert len(status.ready) == status.target, status
        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            conn.execute("DELETE FROM ohlcv_daily")
        restore_pristine(loaded, refill=False)
        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone() == (21,)
        if done:  # the default for this server: none when the copy it measured was fast (FAST_COPY)
            assert not status.why.startswith(f"pool {status.target}: chosen"), status
            break
        # Back to the old server for the next step: a chosen 2 is written, then made to look old above.
        save_pristine(loaded, pool_size=2)
    assert step > 3


def _status_pool(ws: Workspace) -> dict[str, object]:
    [server] = json.loads(ws.run("status", "--profile", ws.profile, "--json").stdout)["servers"]
    return server["pool"]  # type: ignore[no-any-return]


@pytest.mark.postgres
def test_the_cli_default_on_ext4_keeps_no_clone_and_a_given_size_is_honoured(workspace: Workspace) -> None:
    ws = workspace
    report = ws.refresh()
    if (
        report["pool_size"] != 0
    ):  # a copy timed slow on a loaded machine: one fast copy measured before counts
        assert f"(over {FAST_COPY} s)" in str(_status_pool(ws)["why"]), report
        _seed_rate(ws.server(), 2**40)
        with psycopg.connect(ws.dsn(), autocommit=True) as conn:
            conn.execute("DELETE FROM ohlcv_daily WHERE symbol = 'AAPL'")
        report = ws.refresh("--verify")
    assert report["pool_size"] == 0, report
    before = ws.checksums()
    pool = _status_pool(ws)
    assert (pool["size"], pool["ready"], pool["reset"]) == (0, 0, "copy")
    assert str(pool["why"]).startswith("pool 0: no reflink here and a copy resets in 0.")
    assert "pool 0: no reflink here" in ws.run("status", "--profile", ws.profile).stdout
    with psycopg.connect(ws.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min")
    reset = json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)
    assert reset["method"] == "template" and ws.checksums() == before
    time.sleep(1)  # a detached refill, if any, would have made a clone by now: none is wanted
    assert pool_databases(ws) == []

    # $REFRESHER_POOL_SIZE=2 is honoured on the no-op...
    two = {**ws.env, "REFRESHER_POOL_SIZE": "2"}
    done = subprocess.run(
        ws.command("refresh", "--profile", ws.profile, "--json"), env=two, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["pool_size"] == 2
    assert len(wait_for_pool_databases(ws, 2)) == 2
    assert str(_status_pool(ws)["why"]).startswith("pool 2: chosen")
    # ...and remembered: a refresh without it that takes a new snapshot keeps it.
    with psycopg.connect(ws.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE symbol = 'KO'")
    report = ws.refresh("--verify")
    assert report["snapshot"] == "saved" and report["pool_size"] == 2, report
    assert len(wait_for_pool_databases(ws, 2)) == 2
    assert ws.refresh("--pool-size", "1")["pool_size"] == 1
    assert len(wait_for_pool_databases(ws, 1)) == 1
    assert ws.checksums() == before


@contextlib.contextmanager
def loop_mounted(mkfs: list[str], size: int, why: str) -> Iterator[Path]:
    """A directory on a loop device of ``size`` bytes (a sparse image: it takes only what is written) made by
    ``mkfs`` (its argv, the image appended), unmounted after; skips the test without root, the tools (``why``
    says which) or a loop device."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in (mkfs[0], "mount", "umount")):
        pytest.skip(f"needs root and {why} for a loop device")
    work = world_traversable_tmp("refresher-loop-")
    image, mount = work / "fs.img", work / "fs"
    with image.open("wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs, str(image)], check=True)
    mount.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True).returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip("no loop device to mount an image on")
    try:
        mount.chmod(0o755)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def xfs_root() -> Iterator[Path]:
    """A directory on an XFS loop device made with reflink=1 (root and mkfs.xfs only)."""
    with loop_mounted(["mkfs.xfs", "-q", "-m", "reflink=1"], 2 << 30, "mkfs.xfs (Debian: xfsprogs)") as mount:
        yield mount


@pytest.mark.postgres
@pytest.mark.slow
def test_on_xfs_with_reflink_the_default_keeps_the_pool(xfs_root: Path) -> None:
    ws = Workspace(xfs_root, "local", f"xfs_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    try:
        report = ws.refresh()
        assert report["pool_size"] == DEFAULT_POOL_SIZE, report
        pool = _status_pool(ws)
        assert pool["size"] == DEFAULT_POOL_SIZE and "reflinks here" in str(pool["why"]), pool
        assert len(wait_for_pool_databases(ws, DEFAULT_POOL_SIZE)) == DEFAULT_POOL_SIZE
        reset = json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)
        assert reset["method"] == "pool"
        # A size the user chose records the probe's answer too: the refill and `status` read it there.
        assert ws.refresh("--pool-size", "1")["pool_size"] == 1
        assert " pool_size=1 chosen reflink " in _mark(ws.server())
    finally:
        ws.down()


def test_auto_parses_and_the_pytest_plugin_takes_it_as_its_own_default() -> None:
    assert parse_pool_size("auto") == parse_pool_size(" AUTO ") == AUTO_POOL
    assert pool_as_asked(AUTO_POOL, 2, False) and not pool_as_asked(AUTO_POOL, 2, True)
    assert pool_as_asked(2, 2, True) and not pool_as_asked(2, 2, False) and pool_as_asked(None, 3, True)
    assert pool_size_for_workers(AUTO_POOL, 2) == pool_size_for_workers(None, 2) == 3
    assert pool_size_for_workers(0, 2) == 0


@pytest.fixture
def small_ext4() -> Iterator[Path]:
    """A directory on a 1.5 GB ext4 loop device (root and mkfs.ext4 only); a ``fallocate``'d file takes its free
    space without writing a byte."""
    with loop_mounted(["mkfs.ext4", "-q", "-F"], 1536 << 20, "mkfs.ext4") as mount:
        yield mount


def _tight_disk(ws: Workspace, mount: Path, size: int | None, clones: float) -> tuple[ServerInfo, int]:
    """Load ``ws``'s server on ``mount`` with no clone, fill the disk (``mount``/filler) to leave room past the
    reserve for ``clones`` clones, and ask for a pool of ``size`` (None: not yet); the server and the reserve."""
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    assert ws.refresh("--pool-size", "0")["pool_size"] == 0  # no clone yet: the disk measured without
    server = ws.server()
    refills_gone(server.dbname)  # the refresh's own refill: this test's refills are the only ones
    clone = _database_bytes(server, pristine_name(server.dbname)) + COPY_SLACK
    usage = shutil.disk_usage(mount)
    reserve = disk_reserve(usage.total)
    room = usage.free - reserve - int(clone * clones)
    assert room > 0, (usage, clone)
    subprocess.run(["fallocate", "-l", str(room), str(mount / "filler")], check=True)
    assert size is None or resize_pool(server, size) is not None
    return server, reserve


# ``wait_for_pool``'s timeout where it is to return short of the mark's size: a deadline (it raises there), which a
# wait for the full size of 3 reaches on a disk that holds fewer (the bug of 42a77c4).
SHORT_POOL_DEADLINE = 60


def _short_of_the_mark(status: PoolStatus) -> int:
    """The clones ready as ``wait_for_pool`` returned ``status``, fewer than the size the mark asks (3): it returned
    on the refill's record of what the disk holds, not on a full pool."""
    assert status.target == 3 and len(status.ready) < status.target, status
    return len(status.ready)


@pytest.mark.postgres
@pytest.mark.slow
def test_wait_for_pool_returns_once_the_refill_made_what_the_disk_holds(small_ext4: Path) -> None:
    """``wait_for_pool`` (the pytest plugin's tests, the fixtures' and the bench's waits) on a pool the disk cut
    waited for the size asked, to its timeout. It returns once the refill has made what the disk holds: at once
    after one, and after a reset only when the refill the reset spawned has made its clone again.

    The wait returns short of the mark's size only through the refill's record (``_settled``); it raises at its
    timeout otherwise. So its timeout is the test's deadline, not a timing: returning at all with ``made`` of 3
    is the behaviour (its timed asserts, under 5 and 30 s, could fail a loaded machine's run for nothing)."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    try:
        server, _ = _tight_disk(ws, small_ext4, 3, 1.5)
        made = refill_pool(server)
        assert 1 <= made < 3
        assert _short_of_the_mark(wait_for_pool(server, timeout=SHORT_POOL_DEADLINE)) == made
        assert restore_pristine(server).method == "pool"  # takes the clone; a detached refill makes it again
        assert _short_of_the_mark(wait_for_pool(server, timeout=SHORT_POOL_DEADLINE)) == made
    finally:
        ws.down()


@pytest.mark.postgres
@pytest.mark.slow
def test_wait_for_pool_returns_once_a_refill_given_its_own_size_made_what_the_disk_holds(
    small_ext4: Path,
) -> None:
    """A refill given a size of its own (``refill_pool(size=)``, the pytest plugin's refill thread) records what
    the disk held of the size it asked: ``wait_for_pool`` took that record for none but the mark's size, and
    waited to its timeout for a pool the disk had cut just as short."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    try:
        server, _ = _tight_disk(ws, small_ext4, 3, 1.5)
        made = refill_pool(server, size=4)
        assert 1 <= made < 3, made
        assert _short_of_the_mark(wait_for_pool(server, timeout=SHORT_POOL_DEADLINE)) == made
    finally:
        ws.down()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_refresh_the_disk_cuts_says_so_in_its_report(small_ext4: Path) -> None:
    """The refill a CLI refresh spawns is detached: its one line about the disk reaches nobody. The refresh
    computes the bound before spawning it and reports the same line (``pool_disk``, and on the pool's row),
    counting as free what the refill drops before it copies."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    try:
        server, _ = _tight_disk(ws, small_ext4, None, 1.5)
        report = ws.refresh("--pool-size", "3")
        said = re.fullmatch(
            r"the disk holds (\d) of 3 warm clones, keeping .* a reset without a clone copies",
            report["pool_disk"] or "",
        )
        assert said is not None, report
        # The refill cuts the pool too; to the same count give or take one: the clone is ~10 MB, and the server's
        # WAL (16 MB segments, recycled at a checkpoint) moves the free space by as much meanwhile.
        assert 1 <= int(said.group(1)) < 3 and 1 <= len(wait_for_pool(server, timeout=60).ready) < 3
    finally:
        ws.down()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_disk_with_room_for_less_than_one_clone_past_its_reserve_gets_none_and_a_reset_copies(
    small_ext4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Room past the reserve for half a clone: the refill made one anyway (a floor of one), eating into the
    reserve. It makes none now, says so, and a reset copies the pristine database (its data back, the pool
    still empty once the refill it spawned ends: ``wait_for_pool`` returns)."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    try:
        server, reserve = _tight_disk(ws, small_ext4, 2, 0.5)
        capsys.readouterr()
        assert refill_pool(server) == 0
        assert shutil.disk_usage(small_ext4).free >= reserve, "the reserve was spent"
        assert "the disk holds 0 of 2 warm clones" in capsys.readouterr().err
        assert "the disk holds 0 of 2 warm clones" in pool_status(server).why
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("DELETE FROM ohlcv_daily")
        assert restore_pristine(server).method == "template"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone() != (0,)
        assert wait_for_pool(server, timeout=60).ready == ()
    finally:
        ws.down()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_refill_on_a_small_disk_makes_fewer_clones_keeping_the_reserve_free_and_says_so_once(
    small_ext4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server whose data directory is on a small filesystem: a pool of 3 asked, with room past the reserve
    (``disk_reserve``: a tenth of the filesystem, at least 1 GB) for one and a half clones. The refill makes
    fewer than 3, leaves the reserve free, and says so in one line (not an error); `refresher status` says why.
    With the room back, the next refill makes all 3, silently."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    filler = small_ext4 / "filler"
    try:
        server, reserve = _tight_disk(ws, small_ext4, 3, 1.5)
        capsys.readouterr()
        made = refill_pool(server)
        said = [line for line in capsys.readouterr().err.splitlines() if "warm clones" in line]
        status = pool_status(server)
        assert 1 <= made == len(status.ready) < 3, status
        assert shutil.disk_usage(small_ext4).free >= reserve - COPY_SLACK, "the reserve was spent"
        assert len(said) == 1, said  # once, though each of its copies looks again
        assert said[0].startswith(
            f"refresher: pool of {server.dbname}: the disk holds {made} of 3 warm clones, keeping "
            f"{reserve / 2**30:.1f} GB free on "
        ) and said[0].endswith("; a reset without a clone copies"), said
        assert f"the disk holds {made} of 3 warm clones" in status.why, status
        filler.unlink()
        capsys.readouterr()
        assert refill_pool(server) == 3 - made
        assert len(pool_status(server).ready) == 3
        assert "warm clones" not in capsys.readouterr().err
    finally:
        ws.down()


def _answered(said: list[str]) -> bool:
    """Whether ``refresh -v`` said the stamp answered (through psql, or psycopg when the probe could not tell)."""
    return len(said) == 1 and (
        said[0] == "answered through psql" or said[0].startswith("answered through psycopg")
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_a_pool_the_disk_cut_is_no_work_for_the_next_refresh_and_a_refill_finds_the_room_freed(
    small_ext4: Path,
) -> None:
    """A second `refresh --pool-size 3` on a disk that cut the pool to fewer clones is a no-op: the stamp answers
    (the mark records the 3 asked, the clones ready are not compared), without the first run's disk note: that
    was its estimate before spawning its refill, and the stamped report saying it again would read as a disk
    measured and a refill spawned again. Without the stamp, the full path does no work either (the snapshot is
    current, the mark as asked: no refill spawned, the settled record untouched). Room freed later is found by
    the next refill (a reset's here; a new snapshot's or a new size's too), not by a refresh with nothing to do."""
    ws = Workspace(small_ext4, "local", f"disk_{uuid.uuid4().hex[:8]}")
    try:
        server, _ = _tight_disk(ws, small_ext4, None, 1.5)
        first = ws.refresh("--pool-size", "3")
        assert not stamped(first) and first["pool_disk"] is not None, first
        second, said = refresh_saying(ws, "--pool-size", "3")  # the first's refill may still be at work
        assert _answered(said) and stamped(second) and second["pool_disk"] is None, (said, second)
        cut = wait_for_pool(server, timeout=60).ready
        refills_gone(server.dbname)
        assert 1 <= len(cut) < 3, cut
        (settled,) = (ws.root / "state" / "local" / ws.profile / "pgdata").glob(".refresher-pool-settled-*")
        recorded = settled.stat().st_mtime_ns

        stamp_file(ws).unlink()
        full, said = refresh_saying(ws, "--pool-size", "3")
        assert said[0].startswith("not used: no stamp") and said[-1] == "written", said
        assert full["segments"]["loaded"] == 0 and full["snapshot"] == "unchanged", full
        assert full["pool_disk"] is None and full["pool_size"] == 3, full
        refills_gone(server.dbname)
        assert settled.stat().st_mtime_ns == recorded and pool_status(server).ready == cut

        (small_ext4 / "filler").unlink()
        again, said = refresh_saying(ws, "--pool-size", "3")
        assert _answered(said) and again["pool_disk"] is None, (said, again)
        refills_gone(server.dbname)
        assert pool_status(server).ready == cut  # nothing to do: no refill looked at the disk
        assert json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)["method"] == "pool"
        assert len(wait_for_pool(server, timeout=60).ready) == 3
    finally:
        ws.down()


def test_an_ionice_that_cannot_run_leaves_the_refill_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill's priority is best effort: an ionice whose exec fails (here not a program: ENOEXEC; in a CI,
    EFAULT) must not raise out of ``_lower_priority`` and fail the refill."""
    from refresher.pool import _lower_priority

    broken = tmp_path / "ionice"
    broken.write_bytes(b"\x00not a program")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    _lower_priority(os.getpid())
