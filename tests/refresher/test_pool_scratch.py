"""What a kill leaves of the pool's work on disk: the reflink probe's scratch directories in the server's data
directory (a SIGKILL inside one left it for good), swept once their process is gone and never while it lives;
and a refresh's snapshot and refill killed at any step, after which the next ones leave no orphan, in the
catalog or on disk. Against real processes and a real local server of this module's own."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from refresher import pool
from refresher.diskfull import data_directory
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.errors import SnapshotError
from refresher.snapshot import (
    is_current,
    pristine_name,
    restore_pristine,
    save_pristine,
)
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_snapshot import _mark
from tests.refresher.test_snapshot_crash import (
    _databases,
    _kill_steps,
    _killed_after,
    _state,
    _toggle_february,
)

# A reflink probe (``pool._reflinks`` of argv[1]) whose FICLONE, inside its scratch directory, SIGKILLs it
# (argv[2] "kill") or says "inside" and waits to be killed ("wait").
PROBE = """
import fcntl, os, signal, sys, time
from pathlib import Path
from refresher import pool
def inside(*args):
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("inside", flush=True)
    time.sleep(600)
fcntl.ioctl = inside
pool._reflinks(Path(sys.argv[1]))
"""


# What the probe names its scratch directories (``pool.SCRATCH_PREFIX``), as an older refresher did too.
PREFIX = ".refresher-reflink-"


def _scratch(directory: Path) -> set[Path]:
    return set(directory.glob(f"{PREFIX}*"))


def test_a_probe_killed_in_its_scratch_directory_leaves_it_to_the_next_probe_never_a_live_ones(
    tmp_path: Path,
) -> None:
    killed = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), "kill"], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    dead = _scratch(tmp_path)
    assert len(dead) == 1  # what the kill left
    old = tmp_path / f"{PREFIX}k3_x9q2a"  # an older refresher's, never locked
    old.mkdir()
    (old / "a").write_bytes(bytes(4096))
    live = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(tmp_path), "wait"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout is not None and live.stdout.readline() == "inside\n"
        mine = _scratch(tmp_path) - dead - {old}
        assert len(mine) == 1
        pool._reflinks(tmp_path)  # another process's probe: the dead ones go, the live one stays
        assert _scratch(tmp_path) == mine
        assert sorted(p.name for p in next(iter(mine)).iterdir()) == ["a", "b"]  # untouched
    finally:
        live.kill()
        live.communicate()
    pool._reflinks(tmp_path)
    assert _scratch(tmp_path) == set()


def test_a_scratch_directory_swept_between_its_mkdir_and_its_lock_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process's sweep runs in the instant between the probe's mkdir and its lock: it takes the new
    # directory (unlocked) and removes it; the probe makes another, whole.
    made: list[str] = []
    real = tempfile.mkdtemp

    def swept_at_once(*args: object, **kwargs: object) -> str:
        path = real(*args, **kwargs)  # type: ignore[call-overload]
        made.append(path)
        if len(made) == 1:
            pool._sweep_scratch(tmp_path)
        return str(path)

    monkeypatch.setattr(tempfile, "mkdtemp", swept_at_once)
    with pool._scratch(tmp_path) as scratch:
        assert len(made) == 2 and str(scratch) == made[1] and not Path(made[0]).exists()
        (scratch / "a").write_bytes(b"x")
        pool._sweep_scratch(tmp_path)  # ours, locked: it stays
        assert (scratch / "a").read_bytes() == b"x"
    assert _scratch(tmp_path) == set()


@pytest.fixture(scope="module")
def pg_server() -> Iterator[ServerInfo]:
    """This module's own local server (``loaded`` makes its databases here): its data directory holds the
    probes' scratch directories, and no other test's refill sweeps them meanwhile."""
    engine = LocalEngine(world_traversable_tmp("refresher-scratch-") / "state")
    info = engine.start("ps_scratch")
    try:
        yield info
    finally:
        engine.stop("ps_scratch")


def _data_directory(server: ServerInfo) -> Path:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        found = data_directory(conn)
    assert found is not None
    return found


# A snapshot's reflink probe SIGKILLed inside its scratch directory, on the real server.
KILLED_PROBING = """
import fcntl, os, signal
fcntl.ioctl = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
with pool._admin(server.dsn("postgres")) as conn:
    pool.server_reflinks(conn)
"""


@pytest.mark.postgres
def test_the_refill_and_the_next_snapshot_sweep_what_a_killed_probe_left(loaded: ServerInfo) -> None:
    # The refill after every reset sweeps, though it probes no more (the mark says); so does every snapshot's
    # probe, whoever chose the size.
    directory = _data_directory(loaded)
    save_pristine(loaded, pool_size=1, fill_pool=False)
    assert " chosen noreflink " in _mark(loaded)  # probed though the user chose the size
    assert not _killed_after(loaded, 0, KILLED_PROBING)
    assert len(_scratch(directory)) == 1
    pool.refill_pool(loaded)
    assert _scratch(directory) == set()
    assert not _killed_after(loaded, 0, KILLED_PROBING)
    assert len(_scratch(directory)) == 1
    save_pristine(loaded, pool_size=1, fill_pool=False)
    assert _scratch(directory) == set()


@pytest.mark.postgres
def test_status_a_wait_and_the_refreshs_disk_note_leave_the_data_directory_as_it_was(
    loaded: ServerInfo,
) -> None:
    """``refresher status`` (``pool_status``), a refresh's disk note (``disk_cut``) and every tick of
    ``wait_for_pool`` probed the disk for reflinks: a scratch directory made and removed in the server's data
    directory each time. The snapshot records the answer in the mark, and they read it there."""
    directory = _data_directory(loaded)
    save_pristine(loaded, pool_size=1, fill_pool=False)  # no refill: the pool stays short of its clone
    before = directory.stat().st_mtime_ns
    time.sleep(0.05)  # past the clock's tick: an entry made or removed from here on moves the mtime
    status = pool.pool_status(loaded)
    assert (status.target, status.ready) == (1, ()), status
    assert pool.disk_cut(loaded) is None
    with pytest.raises(SnapshotError, match="pool has 0/1 clones after 1s"):
        pool.wait_for_pool(loaded, timeout=1)
    assert directory.stat().st_mtime_ns == before


@pytest.mark.postgres
def test_a_wait_for_the_pool_opens_one_session(loaded: ServerInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tick of ``wait_for_pool`` (every 0.1 s) opened two sessions: a ``pool_status`` and one to read what
    the last refill settled. The wait keeps one."""
    save_pristine(loaded, pool_size=1, fill_pool=False)
    opened: list[object] = []
    connect = psycopg.connect

    def counted(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        opened.append(args)
        return connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", counted)
    with pytest.raises(SnapshotError, match="pool has 0/1 clones after 1s"):
        pool.wait_for_pool(loaded, timeout=1)
    assert len(opened) == 1, len(opened)


# The step counter of ``_killed_after`` also counts the probe's mkdir of its scratch directory (before its lock)
# and its FICLONE inside it (just before); then a refresh's snapshot (no size given: it probes) and its refill.
SNAPSHOT_AND_REFILL = """
import fcntl, tempfile
mkdtemp, ioctl = tempfile.mkdtemp, fcntl.ioctl
tempfile.mkdtemp = lambda *args, **kwargs: (mkdtemp(*args, **kwargs), after_statement())[0]
fcntl.ioctl = lambda *args: (after_statement(), ioctl(*args))[1]  # before: FICLONE fails on ext4
snapshot.save_pristine(server)
pool.refill_pool(server)
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_kill_9_at_any_step_of_a_snapshot_and_its_refill_leaves_no_orphan_after_the_next(
    loaded: ServerInfo,
) -> None:
    directory, db = _data_directory(loaded), loaded.dbname
    save_pristine(loaded)  # no size given: each snapshot probes the disk
    probed = 0
    for step in _kill_steps(80, "the snapshot and refill never finished"):
        _toggle_february(loaded)  # a new snapshot to take
        expected = _state(loaded.dsn())
        finished = _killed_after(loaded, step, SNAPSHOT_AND_REFILL)
        probed += bool(_scratch(directory))
        try:  # before the next refresh: the old copy or the new, or a one-line refusal
            restore_pristine(loaded, refill=False)
        except SnapshotError as exc:
            assert "run `refresher refresh`" in str(exc) and "\n" not in str(exc), step
        # The next refresh: its snapshot when the kill left none current, then its refill.
        if not is_current(loaded):
            save_pristine(loaded, fill_pool=False)
        pool.refill_pool(loaded)
        status = pool.pool_status(loaded)
        slots = {pool.pool_name(db, n) for n in range(status.target)}
        assert _databases(loaded) == {db, pristine_name(db), *slots}, f"step {step}"
        assert set(status.ready) == slots, f"step {step}"
        assert _scratch(directory) == set(), f"step {step}"
        with psycopg.connect(loaded.dsn(), autocommit=True) as conn:
            conn.execute("TRUNCATE ohlcv_daily, refresher_segments")
        restore_pristine(loaded, refill=False)
        assert _state(loaded.dsn()) == expected, f"step {step}"
        if finished:
            break
    assert step > 5 and probed >= 2  # the kills landed between the steps, two of them in the probe
