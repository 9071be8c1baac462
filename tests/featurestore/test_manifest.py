"""The DuckDB manifest: short transactions, the access journal, and never holding the file open."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from featurestore import AccessCounts, Entry, FeatureStore
from featurestore.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]


def table(n: int = 3) -> pa.Table:
    ts = pa.array(range(n), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "v": [float(i) for i in range(n)]})


def test_schema_has_the_documented_columns(store: FeatureStore) -> None:
    with duckdb.connect(str(store.manifest.path), read_only=True) as con:
        columns = {row[0] for row in con.execute("DESCRIBE entries").fetchall()}
    assert {
        "key", "path", "symbol", "start_ts", "end_ts", "rows", "file_size_bytes", "hash_method",
        "created_ts", "last_accessed_ts", "content_hash",
    } <= columns  # fmt: skip


def test_entry_is_frozen_and_path_is_absolute(store: FeatureStore) -> None:
    entry = store.put("k", table())
    assert isinstance(entry, Entry) and entry.path.is_absolute()
    with pytest.raises(AttributeError):
        entry.rows = 5  # type: ignore[misc]
    with duckdb.connect(str(store.manifest.path), read_only=True) as con:
        (stored_path,) = con.execute("SELECT path FROM entries").fetchone() or ("",)
    assert not Path(stored_path).is_absolute()  # relative: the root can move


def test_manifest_is_closed_between_calls(store: FeatureStore) -> None:
    store.put("k", table())
    store.get("k")
    store.lookup(["k"])
    # Another process can open it for writing: it would fail if this process still held it.
    code = f"import duckdb; duckdb.connect({str(store.manifest.path)!r}).execute('SELECT 1').fetchall()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_manifest_is_closed_after_a_read_that_left_a_transaction_open(store: FeatureStore) -> None:
    store.put("k", table())
    # A transaction left open in a read would keep the file open past its detach: it is rolled back first.
    with pytest.raises(RuntimeError), Manifest(store.root).read(fold=False) as con:
        con.execute("BEGIN TRANSACTION")
        raise RuntimeError("abort")
    code = f"import duckdb; duckdb.connect({str(store.manifest.path)!r}).execute('SELECT 1').fetchall()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "k" in store.lookup(["k"]) and store.get("k") == table()


def test_a_root_whose_path_holds_a_quote(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "it's")
    store.put("k", table())
    assert store.lookup(["k"])["k"].rows == 3 and store.get("k") == table()


def test_hits_are_journaled_then_folded(store: FeatureStore) -> None:
    store.put("k", table())
    store.get_many(["k", "k", "nope"])
    journal = store.root / "access.journal"
    assert journal.read_text().count("\tk\t") == 2
    stats = store.get_cache_stats()  # a read that shows counters or access times folds the journal first
    assert (stats.hits, stats.misses) == (2, 1)
    assert not journal.exists() or journal.stat().st_size == 0
    assert list(store.root.glob("access.journal.*.folding")) == []


def test_warm_reads_leave_the_journal_to_the_next_write(store: FeatureStore) -> None:
    """A pack lookup only locates files: it opens the manifest read-only, so a warm read writes nothing."""
    store.put_many([("a", table(), "S"), ("b", table(), "S")])  # small: one pack, read through the manifest
    journal = store.root / "access.journal"
    before = store.manifest.path.stat().st_mtime_ns
    store.get_many(["a", "b"])
    store.get_many(["a", "b"])
    assert journal.read_text().count("\n") == 4  # not folded by the second read
    assert store.manifest.path.stat().st_mtime_ns == before
    assert store.lookup_hashes(["a"]) and journal.stat().st_size > 0  # hashes show no access time
    store.lookup(["a"])  # lookup shows access times: it folds first
    assert not journal.exists() or journal.stat().st_size == 0
    assert store.get_cache_stats().hits == 4


def test_a_large_journal_is_folded_by_any_read(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("featurestore.manifest._JOURNAL_FOLD_BYTES", 10)
    store.put_many([("a", table(), "S"), ("b", table(), "S")])
    store.get_many(["a", "b"])  # journals ~40 bytes
    store.get_many(["a", "b"])  # its pack lookup finds the journal past the limit: folds it, then appends
    assert store.get_cache_stats().hits == 4
    assert store.lookup_hashes(["a"]) == {"a": (store.lookup(["a"])["a"].content_hash, 3)}


def test_reads_that_never_open_the_manifest_still_fold_a_large_journal(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key with a file of its own is read without the manifest: a read-only workload of such gets (a backtest
    # farm) grew the journal without bound, every access a line, folded only by the next write.
    monkeypatch.setattr("featurestore.manifest._JOURNAL_FOLD_BYTES", 1000)
    store.put("own", table(3))
    journal = store.root / "access.journal"
    for _ in range(200):
        store.get("own")
    assert journal.stat().st_size <= 1000 + 100  # a line or so past the limit at most, never 200 lines
    assert store.get_cache_stats().hits == 200  # nothing lost on the way


def test_a_read_folding_the_journal_never_waits_for_a_gc_or_a_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read past the journal's limit folded it under the manifest lock with the whole lock_timeout (600 s by
    # default): a hit during a gc or a put waited for it, then raised StoreLockTimeout though it had its table.
    monkeypatch.setattr("featurestore.manifest._JOURNAL_FOLD_BYTES", 10)
    store = FeatureStore(tmp_path / "cache", lock_timeout=1)
    store.put("own", table(3))
    journal = store.root / "access.journal"
    with open(store.root / "manifest.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a gc in another process holds it
        for _ in range(3):
            assert store.get("own") == table(3)
        assert journal.read_text().count("\n") == 3  # nothing folded, nothing lost
    store.get("own")  # the lock free again: this read folds
    assert not journal.exists() or journal.stat().st_size == 0
    assert store.get_cache_stats().hits == 4


def _per_key(store: FeatureStore) -> dict[str, tuple[int, Any]]:
    with store.manifest.read(fold=False) as con:
        return {
            key: (hits, ts)
            for key, hits, ts in con.execute("SELECT key, hits, last_accessed_ts FROM entries").fetchall()
        }


def test_a_large_batch_of_hits_is_written_to_the_manifest_at_once(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A planner's one request for 60,000 segments wrote 5 MB of journal lines, which took the journal past its
    # limit, so the same request read them back and folded them: a quarter of a production no-op refresh.
    monkeypatch.setattr("featurestore.manifest._DIRECT_ACCESSES", 4)
    store.put_many([("a", table(), "S"), ("b", table(), "S"), ("c", table(), "S")])
    store.get_many(["c"])  # one pending line, folded by the batch's write
    before = _per_key(store)
    store.manifest.record_access(["a", "a", "b", "gone"], misses=1)
    journal = store.root / "access.journal"
    assert not journal.exists() or journal.stat().st_size == 0
    after = _per_key(store)
    assert {k: hits for k, (hits, _) in after.items()} == {"a": 2, "b": 1, "c": 1}
    assert after["a"][1] > before["a"][1] and after["b"][1] > before["b"][1]
    stats = store.get_cache_stats()
    assert (stats.hits, stats.misses) == (5, 1)  # "gone" counts as a hit asked, as the journal counts it


def test_a_large_batch_of_hits_is_journaled_while_the_manifest_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("featurestore.manifest._DIRECT_ACCESSES", 2)
    store = FeatureStore(tmp_path / "cache", lock_timeout=1)
    store.put_many([("a", table(), "S"), ("b", table(), "S")])
    journal = store.root / "access.journal"
    with open(store.root / "manifest.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a gc in another process holds it: not waited for
        store.manifest.record_access(["a", "b"], misses=1)
        assert journal.read_text().count("\n") == 3
    assert {k: hits for k, (hits, _) in _per_key(store).items()} == {"a": 0, "b": 0}
    stats = store.get_cache_stats()  # folds the journal
    assert (stats.hits, stats.misses) == (2, 1)
    assert {k: hits for k, (hits, _) in _per_key(store).items()} == {"a": 1, "b": 1}


def test_the_journal_folds_each_keys_latest_access_and_every_hit(store: FeatureStore) -> None:
    store.put_many([("a", table(), "S"), ("b", table(), "S")])
    with store.manifest.write() as txn:
        txn.con.execute("UPDATE entries SET last_accessed_ts = TIMESTAMP '2020-01-01'")
    (store.root / "access.journal").write_text(
        "H\ta\t1700000000000000\nH\ta\t1800000000000000\nH\ta\t1600000000000000\nH\tb\t1500000000000000\n"
        "M\t-\t1\nH\tb\tx\nX\tb\t1\n"
    )
    assert store.get_cache_stats().hits == 4
    folded = _per_key(store)
    assert folded["a"] == (3, dt.datetime(2027, 1, 15, 8, 0))  # 1.8e15 us after the epoch
    assert folded["b"] == (1, dt.datetime(2020, 1, 1))  # an older access never moves the time back


def test_lookup_hashes_answers_as_lookup_does(store: FeatureStore) -> None:
    store.put_many([(f"k{i}", table(i + 1), "S") for i in range(5)])
    keys = [f"k{i}" for i in range(7)]
    entries = store.lookup(keys)
    assert store.lookup_hashes(keys) == {k: (e.content_hash, e.rows) for k, e in entries.items()}
    assert store.lookup_hashes([]) == {}
    before = store.session_counts()
    store.lookup_hashes(keys, count=True)
    assert store.session_counts() - before == AccessCounts(5, 2)


def test_lookup_hashes_ending_finds_every_key_with_the_suffix_and_counts_nothing(store: FeatureStore) -> None:
    store.put_many(
        [
            ("a", table(1), "S"),
            ("a.notes", table(2), "S"),
            ("b.notes", table(3), "S"),
            ("notes", table(), "S"),
        ]
    )
    expected = {k: (e.content_hash, e.rows) for k, e in store.lookup(["a.notes", "b.notes"]).items()}
    before = store.session_counts()
    assert store.lookup_hashes_ending(".notes") == expected and len(expected) == 2
    assert store.lookup_hashes_ending(".rejects") == {}
    assert store.session_counts() == before


def test_torn_journal_lines_are_skipped(store: FeatureStore) -> None:
    store.put("k", table())
    (store.root / "access.journal").write_text("H\tk\t17000000000000\nH\tk\t17")  # killed mid-line
    assert store.get_cache_stats().hits == 1


def test_leftover_folding_file_is_folded(store: FeatureStore) -> None:
    store.put("k", table())
    (store.root / "access.journal.dead.folding").write_text("H\tk\t1700000000000000\nM\t-\t1\n")
    stats = store.get_cache_stats()
    assert (stats.hits, stats.misses) == (1, 1)
    assert not (store.root / "access.journal.dead.folding").exists()


def test_failed_transaction_rolls_back(store: FeatureStore) -> None:
    store.put("k", table())
    manifest = Manifest(store.root)
    with pytest.raises(RuntimeError), manifest.write() as txn:
        txn.con.execute("DELETE FROM entries")
        raise RuntimeError("abort")
    assert "k" in store.lookup(["k"])


@contextlib.contextmanager
def _connection(manifest: Manifest, access: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """The manifest's connection inside a ``write`` (its transaction's) or a ``read``."""
    if access == "write":
        with manifest.write() as txn:
            yield txn.con
    else:
        with manifest.read() as con:
            yield con


def _ctrl_c_once_running(con: duckdb.DuckDBPyConnection) -> None:
    """SIGINT this process once ``con`` runs a query. A Timer's fixed 0.3 s could fire before a loaded machine's
    main thread began the query: a plain KeyboardInterrupt in Python, not DuckDB's 'Query interrupted'."""
    deadline = time.monotonic() + 60
    while con.query_progress() < 0 and time.monotonic() < deadline:  # -1: no query running
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("access", ["write", "read"])
def test_ctrl_c_in_a_query_is_a_keyboard_interrupt_and_damages_nothing(
    store: FeatureStore, access: str
) -> None:
    # DuckDB takes the SIGINT itself and raises RuntimeError("Query interrupted"); a CLI must see Ctrl-C.
    store.put("k", table())
    manifest = Manifest(store.root)
    with pytest.raises(KeyboardInterrupt) as caught, _connection(manifest, access) as con:
        pressing = threading.Thread(target=_ctrl_c_once_running, args=(con,))
        pressing.start()
        try:
            con.execute("SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3").fetchall()
        finally:
            pressing.join()
    assert "Query interrupted" in str(caught.value.__cause__)
    assert "k" in store.lookup(["k"])
    assert sorted(p.name for p in store.root.iterdir() if "aside" in p.name or "damaged" in p.name) == []


def test_lookup_of_thousands_of_keys_is_one_query(store: FeatureStore) -> None:
    store.put_many([(f"seg-{i:04d}", table(1), "S") for i in range(2400)])
    found = store.lookup([f"seg-{i:04d}" for i in range(0, 4800, 2)])
    assert len(found) == 1200
    assert all(e.rows == 1 for e in found.values())


def test_ctrl_c_while_an_interrupted_commit_left_no_transaction_is_still_a_keyboard_interrupt(
    store: FeatureStore,
) -> None:
    # A Ctrl-C during COMMIT: DuckDB ends the transaction and raises "Query interrupted"; the ROLLBACK that
    # followed found none and raised TransactionException over it, a traceback instead of the one line (6 of
    # 20 SIGINTs sent to a process looping over lookups with counts).
    store.put("k", table())
    manifest = Manifest(store.root)
    with pytest.raises(KeyboardInterrupt), manifest.write() as txn:
        txn.con.execute("ROLLBACK")  # what the interrupted COMMIT leaves: no transaction
        raise KeyboardInterrupt
    assert "k" in store.lookup(["k"])


@pytest.mark.parametrize("access", ["read", "write"])
def test_ctrl_c_that_something_inside_swallowed_is_raised_when_the_access_ends(
    store: FeatureStore, access: str
) -> None:
    # DuckDB imports modules from its C++ (result and parameter conversion); a KeyboardInterrupt raised in one
    # such import (waiting on the import lock of a module another thread is importing: the calendars a refresh
    # builds beside its plan) is taken for a missing module and dropped. A cold `refresher refresh` then ignored
    # a Ctrl-C during its plan (2 of 8 tries) and ran on to exit 0.
    store.put("k", table())
    manifest = Manifest(store.root)
    with pytest.raises(KeyboardInterrupt), _connection(manifest, access) as con:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler's KeyboardInterrupt comes first
        except KeyboardInterrupt:
            pass  # what DuckDB's import does with it
        assert con.execute("SELECT count(*) FROM entries").fetchone() == (1,)
    assert "k" in store.lookup(["k"])


def test_asking_whether_the_manifest_may_be_written_keeps_duckdbs_own_lock(tmp_path: Path) -> None:
    """``_unwritable`` (asked before each write and by each read) opened the file to see and closed it: a close
    drops every POSIX lock the process holds on the file, DuckDB's among them, so another process could open a
    manifest this one still had open to write."""
    store = FeatureStore(tmp_path / "cache")
    store.put("k", pa.table({"x": [1]}))
    path = store.manifest.path
    opener = "import duckdb, sys\nduckdb.connect(sys.argv[1]).close()"
    with duckdb.connect(str(path)):  # this process holds DuckDB's lock on the file, as a write does
        assert store.manifest._unwritable() is None
        done = subprocess.run(
            [sys.executable, "-c", opener, str(path)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0 and "lock" in done.stderr.lower(), done.stderr  # before: it opened (exit 0)
