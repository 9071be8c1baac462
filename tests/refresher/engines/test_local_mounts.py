"""The local engine when one state dir is reached by two paths the kernel keeps apart: a bind mount (a dev
container's workspace, a home directory mounted twice). Symlinks resolve to one path; a bind mount does not, and
/proc/<pid>/cwd names the directory by the path the server entered it through."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from refresher.engines.local import LocalEngine, Postmaster
from tests.child_processes import outputs
from tests.fixtures_postgres import found, world_traversable_tmp
from tests.refresher.engines.test_local import _kill_server_keep_data, _starting_postmaster

pytestmark = pytest.mark.postgres


@pytest.fixture
def two_paths() -> Iterator[tuple[Path, Path]]:
    """A directory and a bind mount of it; skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    root = world_traversable_tmp("refresher-mount-")
    real, bound = root / "real", root / "bound"
    real.mkdir(mode=0o755)
    bound.mkdir(mode=0o755)
    done = subprocess.run(
        ["mount", "--bind", str(real), str(bound)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {done.stderr.strip()}")
    try:
        yield real, bound
    finally:
        # A server the test left running would hold the mount.
        for pidfile in found(real, "postmaster.pid"):  # a live pgdata, maybe: not rglob
            running = Postmaster.read(pidfile.parent)
            if running is not None:
                subprocess.run(["kill", "-9", str(running.pid)], check=False)
        subprocess.run(["umount", "-l", str(bound)], check=False)


def test_a_server_started_through_a_bind_mount_is_ours_through_the_other_path(
    two_paths: tuple[Path, Path],
) -> None:
    real, bound = two_paths
    started = LocalEngine(bound).start("lc_mounted")
    with psycopg.connect(started.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    running = Postmaster.read(bound / "local" / "lc_mounted" / "pgdata")
    assert running is not None

    other = LocalEngine(real)
    [status] = other.status("lc_mounted")
    assert status.running, status.detail
    again = other.start("lc_mounted")  # the server already running: not a second postmaster on the same data
    assert again.port == started.port
    with psycopg.connect(again.dsn()) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
    assert other.stop("lc_mounted")
    with pytest.raises(psycopg.OperationalError):  # stopped, not left serving data removed under it
        psycopg.connect(again.dsn(), connect_timeout=2).close()


def test_a_postmaster_starting_through_a_bind_mount_is_waited_for_through_the_other_path(
    two_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    # Its postmaster.pid still empty, the postmaster works in the data directory by the mount's path (its -D and
    # its cwd): a start through the other path that missed it removed the file and started a second postmaster.
    real, bound = two_paths
    engine = LocalEngine(bound)
    started = engine.start("lc_mounted_first")
    with psycopg.connect(started.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, "lc_mounted_first")
    child = _starting_postmaster(bound / "local" / "lc_mounted_first" / "pgdata", 1.5, tmp_path)
    try:
        again = LocalEngine(real).start("lc_mounted_first")
        with psycopg.connect(again.dsn()) as conn:
            assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
    finally:
        [(out, _)] = outputs([child], timeout=60)
    assert out == "kept\n"
    assert LocalEngine(real).stop("lc_mounted_first")
