"""A new local cluster is built under a directory whose subdirectories ext2/3/4 spread over block groups."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from refresher.engines._placement import spread_subdirectories, spreads_subdirectories
from refresher.engines.local import LocalEngine

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the flag is a Linux ioctl")


def _filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on (its longest mount point in /proc/self/mountinfo)."""
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point, fs_type = fields[4], fields[fields.index("-") + 1]
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def _requires_ext(path: Path) -> None:
    if not _filesystem(path).startswith("ext"):
        pytest.skip(f"{path} is on {_filesystem(path)}, which has no FS_TOPDIR_FL")


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    if _filesystem(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    path = Path(tempfile.mkdtemp(prefix="refresher-tmpfs-", dir="/dev/shm"))
    path.chmod(0o755)  # the server's OS user (under root) must enter it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_flag_is_set_once_and_kept(tmp_path: Path) -> None:
    _requires_ext(tmp_path)
    assert not spreads_subdirectories(tmp_path)
    assert spread_subdirectories(tmp_path)
    assert spreads_subdirectories(tmp_path)
    assert spread_subdirectories(tmp_path)  # already set: still True, nothing else changes
    child = tmp_path / "child"
    child.mkdir()
    assert not spreads_subdirectories(child)  # not inherited: the cluster below stays in its one group


def test_where_there_is_no_such_flag_it_is_a_no_op_not_an_error(tmp_path: Path, tmpfs_dir: Path) -> None:
    assert not spread_subdirectories(tmpfs_dir)
    assert not spread_subdirectories(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert not spread_subdirectories(tmp_path / "file")


@pytest.mark.postgres
def test_a_new_cluster_is_built_under_a_spreading_directory_even_one_made_before(
    local_state_dir: Path,
) -> None:
    engine = LocalEngine(local_state_dir)
    _requires_ext(local_state_dir)
    # A profile directory left from before (a kill -9 between its mkdir and the flag, an older refresher):
    root = local_state_dir / "local" / "lp_spread"
    root.mkdir(parents=True)
    assert not spreads_subdirectories(root)
    try:
        info = engine.start("lp_spread")
        assert spreads_subdirectories(root)
        assert not spreads_subdirectories(root / "pgdata")
        with psycopg.connect(info.dsn()) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("lp_spread",)
    finally:
        engine.stop("lp_spread")


@pytest.mark.postgres
def test_a_state_dir_without_the_flag_still_gets_a_working_cluster(tmpfs_dir: Path) -> None:
    engine = LocalEngine(tmpfs_dir)
    try:
        info = engine.start("lp_tmpfs")
        assert not spreads_subdirectories(tmpfs_dir / "local" / "lp_tmpfs")
        with psycopg.connect(info.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        engine.stop("lp_tmpfs")
