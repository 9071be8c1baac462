"""A store whose disk is full: reads go on, and what must write says so in one line (never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import FeatureStore, StoreDiskFull

FEATURESTORE = str(Path(sys.executable).with_name("featurestore"))
KEYS = [f"seg-{i:02d}" for i in range(20)]


def segment(i: int) -> pa.Table:
    return pa.table({"x": list(range(i, i + 10))})


def fill(disk: Path) -> None:
    """Write to ``disk``'s filler until the disk is full."""
    with open(disk / "filler", "ab", buffering=0) as filler:
        try:
            while True:
                filler.write(b"x" * 4096)
        except OSError:
            pass


@pytest.fixture
def full_store(tmp_path: Path) -> Iterator[FeatureStore]:
    """A filled store on a 4 MB tmpfs, then the tmpfs filled to its last byte; skipped where mounting is not
    allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        store = FeatureStore(disk / "store")
        store.put_many([(key, segment(i), "S") for i, key in enumerate(KEYS)])
        fill(disk)
        yield store
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def featurestore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEATURESTORE, *args], capture_output=True, text=True)


def test_reads_go_on_and_writes_are_one_line_on_a_full_disk(full_store: FeatureStore) -> None:
    # Every read journals its accesses: on a full disk get and get_many were an OSError (ENOSPC) traceback.
    assert full_store.get_many(KEYS) == {key: segment(i) for i, key in enumerate(KEYS)}
    assert full_store.get(KEYS[3]) == segment(3)
    root = full_store.root
    assert featurestore("stats", "--cache-root", str(root)).returncode == 0  # nothing to fold: read-only
    # With accesses journaled (room for them made, then taken again), folding them into the manifest must
    # write: stats, verify and gc were a DuckDB TransactionException traceback, exit 1.
    (root.parent / "filler").write_bytes(b"")
    assert full_store.get_many(KEYS[:5]).keys() == set(KEYS[:5])
    fill(root.parent)
    for command in ("stats", "verify", "gc"):
        done = featurestore(command, "--cache-root", str(root))
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"featurestore {command}: disk full: {root} has 0 MB free"), line
    # Freed, the store is as it was: nothing set aside as damaged, every key there and sound.
    (root.parent / "filler").unlink()
    assert not list(root.glob("*damaged*"))
    assert full_store.validate_cache_integrity().ok
    assert full_store.get_cache_stats().entries == len(KEYS)


def test_a_put_whose_files_fill_the_disk_is_one_line_and_leaves_the_store_as_it_was(
    full_store: FeatureStore,
) -> None:
    """The manifest's writes said so in one line (StoreDiskFull), but a batch whose Parquet files filled the disk
    raised the writer's OSError (ENOSPC), chained to a second one from its close: a traceback for a library user
    of ``put``/``get_or_compute``, where the documentation promised StoreDiskFull."""
    big = pa.table({"x": list(range(200_000))})
    for put in (
        lambda: full_store.put_many([(f"new-{i}", big, "S") for i in range(3)]),
        lambda: full_store.put("one", big),
    ):
        with pytest.raises(StoreDiskFull) as caught:  # fails before: OSError [Errno 28]
            put()
        assert str(caught.value).startswith(f"disk full: {full_store.root} has 0 MB free"), caught.value
        assert "\n" not in str(caught.value)
    assert not list(full_store.root.rglob("*.tmp"))
    (full_store.root.parent / "filler").unlink()
    assert full_store.validate_cache_integrity().ok and full_store.get_cache_stats().entries == len(KEYS)
