"""The store's generation (``featurestore.generation``): additions leave it, every removal or replacement moves it,
before the change commits, in a process killed between the steps as in two removing at once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import FeatureStore, collect_garbage
from featurestore.generation import GENERATION_FILE, read_generation
from featurestore.manifest import Row

REPO = Path(__file__).resolve().parents[2]


def filled(root: Path) -> FeatureStore:
    store = FeatureStore(root)
    store.put_many([(f"seg-{s}", pa.table({"x": [n, n + 1]}), s) for n, s in enumerate("ABC")])
    store.put("seg-own", pa.table({"x": list(range(10_000))}), symbol="D")  # a file of its own
    return store


def test_a_store_has_a_generation_that_additions_leave(tmp_path: Path) -> None:
    store = filled(tmp_path / "cache")
    before = read_generation(store.root)
    assert before is not None
    store.put_many([("seg-E", pa.table({"x": [9]}), "E")])  # a new key
    store.put_many([("seg-A", pa.table({"x": [0, 1]}), "A")])  # a key again, with the content it holds
    FeatureStore(store.root).get_many(["seg-A", "seg-E", "seg-own"])
    assert read_generation(store.root) == before
    # a store wiped and made again never has an earlier store's generation
    assert read_generation(filled(tmp_path / "other").root) != before


@pytest.mark.parametrize(
    "removal",
    [
        "clear_cache",
        "gc",
        "evicted",
        "replaced",
        "replaced own file",
        "rebuild",
        "damaged",
        "deleted manifest",
    ],
)
def test_every_removal_or_replacement_moves_the_generation(tmp_path: Path, removal: str) -> None:
    store = filled(tmp_path / "cache")
    before = read_generation(store.root)
    if removal == "clear_cache":
        assert store.clear_cache("A") == 1
    elif removal == "gc":
        collect_garbage(store, retention=dt.timedelta(0))
        assert store.get_cache_stats().entries == 0
    elif removal == "evicted":
        own = next((store.root / "data").glob("*/seg-own.parquet"))
        own.write_bytes(own.read_bytes()[:-100])
        assert store.get("seg-own") is None
    elif removal == "replaced":
        store.put_many([("seg-A", pa.table({"x": [7, 7]}), "A")])
    elif removal == "replaced own file":
        store.put("seg-own", pa.table({"x": [1]}), symbol="D")
    elif removal == "rebuild":
        assert store.rebuild_manifest() == 4
    elif removal == "damaged":
        store.manifest.path.write_bytes(b"not a manifest")
        assert FeatureStore(store.root).get_cache_stats().entries == 4
    else:
        store.manifest.path.unlink()
        assert FeatureStore(store.root).get_cache_stats().entries == 4
    assert read_generation(store.root) not in (before, None)


@pytest.mark.parametrize("removal", ["replaced", "replaced own file", "gc", "damaged", "rebuild"])
def test_a_removal_moves_the_generation_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """Each move is a fsynced replace of the file: a replacing put moved it twice (its own move and its rows'
    delete), a damaged manifest three times (set aside, restored from the files, and again by the restore)."""
    import featurestore.manifest
    from featurestore.generation import move_generation as move

    store = filled(tmp_path / "cache")
    moves: list[str] = []

    def counted(root: Path) -> str:
        moves.append(move(root))
        return moves[-1]

    monkeypatch.setattr(featurestore.manifest, "move_generation", counted)
    if removal == "replaced":
        store.put_many([("seg-A", pa.table({"x": [7, 7]}), "A"), ("seg-B", pa.table({"x": [7]}), "B")])
    elif removal == "replaced own file":
        store.put("seg-own", pa.table({"x": [1]}), symbol="D")
    elif removal == "gc":
        collect_garbage(store, retention=dt.timedelta(0))
    elif removal == "damaged":
        store.manifest.path.write_bytes(b"not a manifest")
        assert FeatureStore(store.root).get_cache_stats().entries == 4
    else:
        assert store.rebuild_manifest() == 4
    assert len(moves) == 1
    assert read_generation(store.root) == moves[0]


def test_a_row_upserted_over_a_key_moves_it(tmp_path: Path) -> None:
    """``Manifest.insert`` without ``present`` deletes every incoming key's row first: a removal like any other
    (``upsert``'s only caller moved it already, so it had not shown)."""
    store = filled(tmp_path / "cache")
    before = read_generation(store.root)
    with store.manifest.write() as txn:
        held = store.manifest.select(txn.con, ["seg-A"])["seg-A"]
        store.manifest.upsert(txn.con, [Row(dataclasses.replace(held, content_hash="xxh3:other"), "segment")])
    assert read_generation(store.root) not in (before, None)
    assert store.lookup_hashes(["seg-A"])["seg-A"][0] == "xxh3:other"


def test_a_collection_that_removes_nothing_leaves_it(tmp_path: Path) -> None:
    store = filled(tmp_path / "cache")
    before = read_generation(store.root)
    collect_garbage(store, retention=dt.timedelta(weeks=4))
    collect_garbage(store, retention=dt.timedelta(0), dry_run=True)
    assert store.clear_cache("nobody") == 0
    assert read_generation(store.root) == before


def test_a_store_from_before_generations_gets_one_when_opened(tmp_path: Path) -> None:
    store = filled(tmp_path / "cache")
    (store.root / GENERATION_FILE).unlink()
    assert read_generation(store.root) is None  # unknown: answers nothing
    assert read_generation(FeatureStore(store.root).root) is not None
    (store.root / GENERATION_FILE).write_text("edited by hand\n")
    assert read_generation(store.root) is None


# Runs a removal (every key of a symbol) in a child that stops at a step (after the generation moved, before the
# commit; or after the commit, before the files are unlinked), says so, and waits to be killed.
STOPPED_REMOVER = """
import contextlib, pathlib, sys, time
import featurestore.manifest as manifest
root, step, marker, symbol = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4]
def stop():
    marker.touch()
    time.sleep(120)
moved, removed = manifest.Manifest.removing, []
def removing(self):
    moved(self)
    removed.append(True)
    if step == "moved":
        stop()
manifest.Manifest.removing = removing
write = manifest.Manifest.write
@contextlib.contextmanager
def writing(self, **options):
    with write(self, **options) as txn:
        yield txn
        if removed:
            txn.actions.insert(0, stop)  # after the commit, before its files are unlinked
manifest.Manifest.write = writing
from featurestore import FeatureStore
FeatureStore(root).clear_cache(symbol)
"""


@pytest.mark.parametrize("step", ["moved", "committed"])
def test_a_remover_killed_between_its_steps_leaves_the_generation_moved(tmp_path: Path, step: str) -> None:
    store = filled(tmp_path / "cache")
    before, marker = read_generation(store.root), tmp_path / "stopped"
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED_REMOVER, str(store.root), step, str(marker), "A"], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        # Never seen unmoved while the removal is in flight: moved, or (committed, the manifest not yet noted
        # by its writer) none, which answers nothing.
        assert read_generation(store.root) != before
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert read_generation(store.root) != before
    assert (store.root / GENERATION_FILE).read_text().split()[0] != before  # the move itself was made durable
    again = FeatureStore(store.root)
    assert read_generation(store.root) not in (before, None)
    held = set(again.lookup_hashes(["seg-A", "seg-B"]))
    assert held == ({"seg-A", "seg-B"} if step == "moved" else {"seg-B"})  # rolled back, or committed


_REMOVER = """
import pathlib, sys
import featurestore.manifest as manifest
from featurestore.generation import read_generation
root, symbol, log = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
moved = manifest.Manifest.removing
def removing(self):
    moved(self)
    with log.open("a") as out:
        out.write(read_generation(self.root) + "\\n")
manifest.Manifest.removing = removing
from featurestore import FeatureStore
store = FeatureStore(root)
for _ in range(5):
    store.put_many([("seg-" + symbol, __import__("pyarrow").table({"x": [1]}), symbol)])
    assert store.clear_cache(symbol) == 1
"""


def test_two_removers_at_once_each_move_the_generation(tmp_path: Path) -> None:
    store = filled(tmp_path / "cache")
    before, log = read_generation(store.root), tmp_path / "moves"
    children = [
        subprocess.Popen([sys.executable, "-c", _REMOVER, str(store.root), symbol, str(log)], cwd=REPO)
        for symbol in ("P", "Q")
    ]
    for child in children:
        assert child.wait(timeout=300) == 0
    moves = log.read_text().split()
    # each of the ten removals moved it (under the manifest's lock: none read another's value) to a new value
    assert len(moves) == len(set(moves)) == 10 and before not in moves
    assert read_generation(store.root) == moves[-1]
    assert set(store.lookup_hashes(["seg-P", "seg-Q", "seg-A"])) == {"seg-A"}


def test_a_generation_file_with_fields_a_newer_writer_adds_is_read(tmp_path: Path) -> None:
    """A word after the value or after the manifest's state, or a line after both, is read as absent: it made the
    generation None (the store taken for changed by another program: every stamp on it void)."""
    store = filled(tmp_path / "cache")
    value = read_generation(store.root)
    assert value is not None
    path = store.root / GENERATION_FILE
    first, state = path.read_text().splitlines()
    for newer in (f"{first} newer\n{state}\n", f"{first}\n{state} newer=1\n", f"{first}\n{state}\nnewer\n"):
        path.write_text(newer)
        assert read_generation(store.root) == value, newer  # fails before: None
    path.write_text(f"{first}\n0:0:0 {state.split()[1]} newer\n")  # the manifest otherwise: still None
    assert read_generation(store.root) is None
    # Its fields are by place: one garbled, missing, or moved after a newer word is still no generation.
    for garbled in (
        f"{first}x newer\n{state}\n",
        f"newer {first}\n{state}\n",
        f"{first} newer\n",
        f"{first}\n{state.split()[0]}\n",
        f"{first}\nnewer {state}\n",
        f"{first}\n{state}x newer\n",
    ):
        path.write_text(garbled)
        assert read_generation(store.root) is None, garbled
