"""A store shared with a checkout whose featurestore predates packs (fbd8ea4~1): that code's gc took every packed
row for corrupt (the pack's size is not the key's share) and unlinked the packs at once. A store this code opened
refuses that code before it touches anything. And one whose featurestore predates the generation (3feedf7~1),
whose removals do not move it: they void it instead (``featurestore.generation.note_manifest``)."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import FeatureStore, FeatureStoreError, StoreDiskFull
from featurestore.generation import read_generation
from tests.featurestore.test_gc import REPO

BEFORE_PACKS = "fbd8ea4~1"
BEFORE_GENERATIONS = "3feedf7~1"


def checkout(tmp_path_factory: pytest.TempPathFactory, revision: str) -> Path:
    """The featurestore package as it was at ``revision``, from this repository's history."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, "featurestore"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:  # a shallow clone without that commit
        pytest.skip(f"git archive {revision}: {archive.stderr.decode().strip()}")
    where = tmp_path_factory.mktemp("checkout")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(where, filter="data")
    return where


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The featurestore package as it was before packs."""
    where = checkout(tmp_path_factory, BEFORE_PACKS)
    assert not (where / "featurestore" / "_packs.py").exists()
    return where


@pytest.fixture(scope="module")
def code_before_generations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = checkout(tmp_path_factory, BEFORE_GENERATIONS)
    assert (where / "featurestore" / "_packs.py").exists()
    assert not (where / "featurestore" / "generation.py").exists()
    return where


def run_old(old_code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(old_code)}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=old_code,
        timeout=120,
        check=False,
    )


def packs(root: Path) -> list[Path]:
    return sorted((root / "data" / "packs").glob("*.parquet"))


@pytest.mark.parametrize("made_before_the_marker", [False, True])
def test_code_from_before_packs_refuses_a_store_with_packs(
    tmp_path: Path, old_code: Path, made_before_the_marker: bool
) -> None:
    root = tmp_path / "store"
    tables = [(f"k{i}", pa.table({"x": list(range(i + 1))}), "SYM") for i in range(5)]
    FeatureStore(root).put_many(tables)
    if made_before_the_marker:  # a store packs were written to before this change: its locks were a directory
        if not (root / "locks").is_dir():
            (root / "locks").unlink()
            (root / "locks").mkdir()
        (root / "locks" / "abc.lock").write_text("")
        FeatureStore(root)  # opening it is enough
    written = packs(root)
    assert len(written) == 1
    gc = run_old(old_code, "-m", "featurestore.gc", "--cache-root", str(root), "--grace-hours", "0")
    assert gc.returncode != 0, gc.stdout
    assert f"{root / 'locks'}" in gc.stderr, gc.stderr
    read = run_old(
        old_code, "-c", f"from featurestore import FeatureStore; FeatureStore({str(root)!r}).get('k0')"
    )
    assert read.returncode != 0
    # Untouched: the pack, and every key as written.
    assert packs(root) == written
    assert "format 2" in (root / "locks").read_text()
    again = FeatureStore(root)
    assert {key: again.get(key) for key, _, _ in tables} == {key: table for key, table, _ in tables}


def locks_directory(root: Path) -> Path:
    """A store opened before the marker: its locks a directory of lock files."""
    FeatureStore(root)
    marker = root / "locks"
    marker.unlink()
    marker.mkdir()
    for i in range(20):
        (marker / f"{i:02d}.lock").write_text("")
    return marker


def test_the_marker_is_in_place_before_the_old_locks_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old locks directory was moved aside, then removed (4,096 files), then the marker written: during the
    removal an older checkout's mkdir succeeded (and its gc deleted the packs), and a kill left no marker."""
    root = tmp_path / "store"
    marker = locks_directory(root)
    removals: list[object] = []

    def older_checkout_then_kill(path: object, *args: object, **kwargs: object) -> None:
        removals.append(path)
        with pytest.raises(FileExistsError):  # an older checkout opening the store meanwhile is refused
            marker.mkdir(exist_ok=True)
        raise KeyboardInterrupt  # stands for a kill -9 while the old lock files are being removed

    monkeypatch.setattr(shutil, "rmtree", older_checkout_then_kill)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(root)
    assert removals and marker.is_file() and "format 2" in marker.read_text()


def test_a_locks_directory_made_again_on_every_try_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop that moves the directory aside gave up silently after 8 tries, leaving no marker."""
    root = tmp_path / "store"
    marker = locks_directory(root)
    rename = os.rename

    def older_checkout_first(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == marker:
            marker.mkdir(exist_ok=True)  # an older checkout's mkdir, just before each rename
        rename(src, dst)

    monkeypatch.setattr(os, "rename", older_checkout_first)
    with pytest.raises(FeatureStoreError, match=f"root={str(root)!r}: .*locks.* is made again") as raised:
        FeatureStore(root)
    assert "\n" not in str(raised.value)
    assert not list(root.glob(".locks-*"))  # nothing left behind


def test_a_full_disk_writing_the_marker_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    root.mkdir()
    write_text = Path.write_text

    def full(path: Path, *args: object, **kwargs: object) -> int:
        if path.name.startswith(".locks-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(StoreDiskFull, match="disk full"):
        FeatureStore(root)
    assert not list(root.glob(".locks-*"))


@pytest.mark.parametrize("change", ["gc", "addition"])
def test_code_from_before_generations_writing_the_store_voids_its_generation(
    tmp_path: Path, code_before_generations: Path, change: str
) -> None:
    """That code's gc removed keys and left the generation as it was: another checkout's stamped no-op refresh
    then trusted a store that had lost them. Whatever it writes now voids the generation (None: no stamp
    answers), and this code's next write moves it (that code may have removed keys)."""
    root = tmp_path / "store"
    store = FeatureStore(root)
    store.put_many([(f"k{i}", pa.table({"x": list(range(i + 1))}), f"S{i}") for i in range(3)])
    before = read_generation(root)
    assert before is not None
    if change == "gc":
        code = (
            "import datetime, sys; from featurestore import FeatureStore, collect_garbage;"
            "report = collect_garbage(FeatureStore(sys.argv[1]), retention=datetime.timedelta(0));"
            "assert report.expired == 3, report"
        )
    else:
        code = (
            "import sys, pyarrow as pa; from featurestore import FeatureStore;"
            "FeatureStore(sys.argv[1]).put('k9', pa.table({'x': [9]}), symbol='S9')"
        )
    old = run_old(code_before_generations, "-c", code, str(root))
    assert old.returncode == 0, old.stderr
    assert read_generation(root) is None
    store.lookup_hashes(["k0"])  # a read of this code's leaves it void
    assert read_generation(root) is None
    FeatureStore(root)
    assert read_generation(root) not in (before, None)
    assert set(store.lookup_hashes(["k0", "k9"])) == (set() if change == "gc" else {"k0", "k9"})
