"""COPY bodies kept beside the entries (``featurestore._bodies``): verified reads, removal of what cannot be used,
collection with their entries, crash safety and two writers at once."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import FeatureStore, collect_garbage
from featurestore._bodies import body_path
from featurestore.render import render_stats
from tests.featurestore.conftest import link_out

REPO = Path(__file__).resolve().parents[2]
LAYOUT = "layout-1"


def table(n: int = 100, offset: int = 0) -> pa.Table:
    ts = pa.array(range(offset, offset + n), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "v": [float(i) for i in range(n)]})


def raw_of(n: int) -> bytes:
    """Stand-in bytes of a body of ``n`` rows (the store does not parse them), compressible as rows are."""
    return b"".join(i.to_bytes(8, "little") * 4 for i in range(n))


def stored(store: FeatureStore, key: str, n: int = 100, offset: int = 0) -> tuple[str, Path]:
    """A key put with its body kept: its content hash and the body's path."""
    entry = store.put(key, table(n, offset))
    assert store.put_bodies([(entry.content_hash, n, raw_of(n))], LAYOUT) > 0
    path = body_path(store.root, entry.content_hash, LAYOUT)
    assert path is not None and path.exists()
    return entry.content_hash, path


def test_a_kept_body_is_read_back_with_its_entry_and_counted_in_the_stats(store: FeatureStore) -> None:
    content, path = stored(store, "k")
    found = store.read_bodies(["k", "absent"], LAYOUT)
    assert list(found) == ["k"]
    entry, body = found["k"]
    assert (entry.content_hash, entry.rows, body.rows) == (content, 100, 100)
    assert bytes(body.raw) == raw_of(100)
    stats = store.get_cache_stats()
    assert (stats.bodies.entries, stats.bodies.bytes) == (1, path.stat().st_size)
    assert stats.entries == 1  # bodies are not entries
    assert "1 COPY bodies" in render_stats(stats)
    assert store.read_bodies(["k"], "another-layout") == {}  # of no use to another encoder


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "layout", "rows", "empty"])
def test_a_body_that_cannot_be_used_is_ignored_and_removed(store: FeatureStore, damage: str) -> None:
    content, path = stored(store, "k", n=500)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x01  # inside the compressed payload: the checksum catches it
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "header":
        data[20] ^= 0x20  # inside the header's JSON
        path.write_bytes(bytes(data))
    elif damage == "layout":  # a body of another layout under this layout's name: its header says so
        store.put_bodies([(content, 500, raw_of(500))], "layout-0")
        other = body_path(store.root, content, "layout-0")
        assert other is not None
        other.replace(path)
    elif damage == "rows":  # a body of other rows than the manifest's row says its content has
        store.put_bodies([(content, 499, raw_of(500))], LAYOUT)
    else:
        path.write_bytes(b"")
    assert store.read_bodies(["k"], LAYOUT) == {}
    assert not path.exists()
    assert store.get("k") == table(500)  # the entry itself is untouched
    assert store.read_bodies(["k"], LAYOUT) == {}  # and now simply absent


@pytest.mark.parametrize("damage", ["flip", "rows"])  # removed by _bodies.read; by read_bodies (rows)
def test_a_body_that_cannot_be_used_through_a_directory_linked_out_of_the_store_is_not_removed(
    store: FeatureStore, tmp_path: Path, damage: str
) -> None:
    content, path = stored(store, "k", n=500)
    if damage == "rows":
        store.put_bodies([(content, 499, raw_of(500))], LAYOUT)
    elsewhere = link_out(path.parent, tmp_path / "elsewhere")
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01
        path.write_bytes(bytes(data))
    assert store.read_bodies(["k"], LAYOUT) == {}
    assert [p.name for p in elsewhere.iterdir()] == [path.name]  # before: []


def test_clear_cache_never_deletes_a_body_through_a_directory_linked_out_of_the_store(
    store: FeatureStore, tmp_path: Path
) -> None:
    _content, path = stored(store, "k")
    elsewhere = link_out(path.parent, tmp_path / "elsewhere")
    assert store.clear_cache() == 1
    assert [p.name for p in elsewhere.iterdir()] == [path.name]  # before: []


def test_a_body_that_is_a_looping_link_is_no_body(store: FeatureStore) -> None:
    """Opening it is ELOOP: read_bodies (every load of minute segments) was an OSError traceback."""
    _content, path = stored(store, "k")
    path.unlink()
    path.symlink_to(path)
    assert store.read_bodies(["k"], LAYOUT) == {}  # before: OSError, too many levels of symbolic links
    assert store.get("k") == table()
    assert path.is_symlink()


def test_stats_count_no_body_for_a_looping_link(store: FeatureStore) -> None:
    """Its stat is ELOOP: `store stats` was an OSError traceback."""
    _content, path = stored(store, "k")
    path.unlink()
    path.symlink_to(path)
    stats = store.get_cache_stats()  # before: OSError, too many levels of symbolic links
    assert (stats.entries, stats.bodies.entries, stats.bodies.bytes) == (1, 0, 0)


def test_a_body_of_another_layout_is_not_this_layouts_and_not_removed_by_it(store: FeatureStore) -> None:
    """Two checkouts sharing a store with other encoders (pgpq versions): each keeps its own body of a content,
    neither reads nor removes the other's; both go with the content's last entry."""
    content, mine = stored(store, "k")
    store.put_bodies([(content, 100, b"y" * 800)], "layout-0")
    theirs = body_path(store.root, content, "layout-0")
    assert theirs is not None and theirs.exists() and theirs != mine
    assert bytes(store.read_bodies(["k"], LAYOUT)["k"][1].raw) == raw_of(100)
    assert bytes(store.read_bodies(["k"], "layout-0")["k"][1].raw) == b"y" * 800
    assert mine.exists() and theirs.exists()
    assert store.get_cache_stats().bodies.entries == 2
    assert collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0)).orphans == 0
    assert mine.exists() and theirs.exists()
    assert store.clear_cache() == 1
    assert not mine.exists() and not theirs.exists()


def test_a_body_replaced_by_a_good_one_while_read_as_bad_stays(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featurestore import _bodies

    content, path = stored(store, "k")
    path.write_bytes(b"garbage")
    decode = _bodies.decode

    def replaced_meanwhile(data: bytes, content_hash: str, layout: str) -> object:
        # another writer renames a good body over the bad one between our read and our removal
        store.put_bodies([(content, 100, raw_of(100))], LAYOUT)
        return decode(data, content_hash, layout)

    monkeypatch.setattr(_bodies, "decode", replaced_meanwhile)
    assert store.read_bodies(["k"], LAYOUT) == {}
    monkeypatch.undo()
    assert bytes(store.read_bodies(["k"], LAYOUT)["k"][1].raw) == raw_of(100)


def test_a_body_goes_with_the_last_entry_of_its_content(store: FeatureStore) -> None:
    entry = store.put("a", table(), symbol="A")
    store.put("b", table(), symbol="B")  # the same content under another key: one body for both
    store.put_bodies([(entry.content_hash, 100, raw_of(100))], LAYOUT)
    path = body_path(store.root, entry.content_hash, LAYOUT)
    assert path is not None
    assert set(store.read_bodies(["a", "b"], LAYOUT)) == {"a", "b"}
    assert store.clear_cache("A") == 1
    assert path.exists()  # b holds the content still
    assert set(store.read_bodies(["a", "b"], LAYOUT)) == {"b"}
    assert store.clear_cache() == 1
    assert not path.exists()


def test_an_evicted_entrys_body_goes_with_it(store: FeatureStore) -> None:
    entry = store.put("k", table(5_000))
    store.put_bodies([(entry.content_hash, 5_000, raw_of(5_000))], LAYOUT)
    path = body_path(store.root, entry.content_hash, LAYOUT)
    assert path is not None and path.exists()
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped bit in the Parquet file: the read evicts the entry
    entry.path.write_bytes(bytes(data))
    assert store.get("k") is None
    assert not path.exists()


def test_gc_collects_a_body_without_its_segment_and_one_of_an_expired_entry(store: FeatureStore) -> None:
    _held, kept = stored(store, "held")
    _old, expired = stored(store, "old", offset=3)
    orphan = body_path(store.root, "xxh3:" + "ab" * 16, LAYOUT)
    assert orphan is not None
    store.put_bodies([("xxh3:" + "ab" * 16, 10, raw_of(10))], LAYOUT)
    young = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert (
        young.orphans == 0 and orphan.exists()
    )  # younger than the grace period: maybe being written for a put
    then = orphan.stat().st_mtime - 7200
    os.utime(orphan, (then, then))
    import duckdb

    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute("UPDATE entries SET last_accessed_ts = last_accessed_ts - to_weeks(5) WHERE key = 'old'")
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert (report.orphans, report.expired) == (1, 1)
    assert report.orphan_bytes > 0
    assert not orphan.exists() and not expired.exists() and kept.exists()
    assert store.validate_cache_integrity().orphans == ()


def test_a_writer_killed_before_its_rename_leaves_nothing_used(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "cache")
    entry = store.put("k", table())
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from featurestore import FeatureStore, _files
        def killed(moves):
            os.kill(os.getpid(), signal.SIGKILL)
        _files.publish_many = killed
        FeatureStore({str(store.root)!r}).put_bodies([({entry.content_hash!r}, 100, b"x" * 800)], {LAYOUT!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == -9
    path = body_path(store.root, entry.content_hash, LAYOUT)
    assert path is not None and not path.exists()
    temps = list(path.parent.glob("*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # written and fsynced, never renamed
    assert store.read_bodies(["k"], LAYOUT) == {}
    assert store.get_cache_stats().bodies.entries == 0
    report = collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    assert report.temporaries == 1 and not temps[0].exists()  # its writer is dead


def test_two_writers_of_one_body_at_once_leave_it_whole(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "cache")
    entry = store.put("k", table(2_000))
    code = textwrap.dedent(
        f"""
        import sys
        from featurestore import FeatureStore
        sys.path.insert(0, {str(REPO / "tests" / "featurestore")!r})
        from test_bodies import raw_of
        store = FeatureStore({str(store.root)!r})
        raw = raw_of(2_000)
        for _ in range(40):
            store.put_bodies([({entry.content_hash!r}, 2_000, raw)], {LAYOUT!r})
            found = store.read_bodies(["k"], {LAYOUT!r})
            assert not found or bytes(found["k"][1].raw) == raw, "a body read back wrong"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env) for _ in range(2)]
    reads = 0
    while any(writer.poll() is None for writer in writers):
        found = store.read_bodies(["k"], LAYOUT)
        if found:
            assert bytes(found["k"][1].raw) == raw_of(2_000)
            reads += 1
    assert [writer.wait() for writer in writers] == [0, 0]
    assert bytes(store.read_bodies(["k"], LAYOUT)["k"][1].raw) == raw_of(2_000)
    path = body_path(store.root, entry.content_hash, LAYOUT)
    assert path is not None and list(path.parent.glob("*.tmp")) == []
