"""Packs: small tables of one batch share one file; every promise of single files still holds for them."""

from __future__ import annotations

import base64
import datetime as dt
import json
import multiprocessing
import struct
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore import FeatureStore, StoreFormatNewer, _files, _writes, collect_garbage
from featurestore._packs import PACK_MAX_ROWS
from featurestore.fingerprint import fingerprint_table
from featurestore.keys import time_range
from featurestore.manifest import STORE_FORMAT
from tests.featurestore._workers import daily
from tests.featurestore.conftest import link_out
from tests.featurestore.test_cli import cli

REPO = Path(__file__).resolve().parents[2]


def batch(prefix: str, n: int = 12) -> list[tuple[str, pa.Table, str]]:
    return [(f"{prefix}-{i:02d}", daily(f"{prefix}-{i:02d}"), f"S{i % 3}") for i in range(n)]


def packs(store: FeatureStore) -> list[Path]:
    return sorted((store.root / "data" / "packs").glob("*.parquet"))


def own_files(store: FeatureStore) -> list[Path]:
    return sorted(p for p in (store.root / "data").glob("*/*.parquet") if p.parent.name != "packs")


def test_a_batch_of_small_tables_is_one_file_read_back_exactly(store: FeatureStore) -> None:
    items = batch("a")
    entries = store.put_many(items)
    [pack] = packs(store)
    assert own_files(store) == [] and {e.path for e in entries} == {pack}
    assert [e.pack_offset for e in entries] == [21 * i for i in range(12)]
    assert sum(e.file_size_bytes for e in entries) == pack.stat().st_size == entries[0].pack_bytes
    got = store.get_many([k for k, _t, _s in items])
    assert all(got[k].equals(t) for k, t, _s in items)
    assert store.get("a-05") == items[5][1]
    stats = store.get_cache_stats()
    assert (stats.entries, stats.bytes) == (12, pack.stat().st_size)
    assert store.validate_cache_integrity().ok and store.validate_cache_integrity(deep=False).ok


def test_packs_through_a_directory_linked_out_of_the_store_are_never_deleted(
    store: FeatureStore, tmp_path: Path
) -> None:
    """data/packs replaced by a symbolic link to another place: a put that moved every key of a pack there, and
    the eviction of a damaged pack's keys, removed the pack (as GC did before it learnt not to)."""
    store.put_many(batch("a"))
    [old] = packs(store)
    elsewhere = link_out(old.parent, tmp_path / "elsewhere")
    store.put_many([(key, daily(key, rows=5), symbol) for key, _t, symbol in batch("a")])  # other content
    [new] = set(packs(store)) - {old}
    assert sorted(elsewhere.iterdir()) == sorted([elsewhere / old.name, elsewhere / new.name])  # before: new
    new.write_bytes(new.read_bytes()[: new.stat().st_size // 2])
    assert store.get_many([key for key, _t, _s in batch("a")]) == {}  # evicted
    assert sorted(elsewhere.iterdir()) == sorted([elsewhere / old.name, elsewhere / new.name])


def test_large_tables_and_lone_schemas_keep_files_of_their_own(store: FeatureStore) -> None:
    large = daily("large", rows=PACK_MAX_ROWS)
    lone = pa.table({"other": [1, 2, 3]})
    entries = store.put_many([*batch("b", 3), ("large", large, "S"), ("lone", lone, "S")])
    assert [e.pack_offset is None for e in entries] == [False, False, False, True, True]
    assert [p.stem for p in own_files(store)] == ["large", "lone"] and len(packs(store)) == 1
    assert store.get("large") == large and store.get("lone") == lone


def test_a_damaged_pack_costs_only_its_own_keys(store: FeatureStore) -> None:
    store.put_many(batch("good"))
    store.put_many(batch("bad"))
    bad_pack = store.lookup(["bad-00"])["bad-00"].path
    data = bytearray(bad_pack.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8  # the Parquet footer, its length and the magic
    data[4 : len(data) - footer] = bytes(len(data) - footer - 4)  # every data page zeroed, footer intact
    bad_pack.write_bytes(bytes(data))
    report = store.validate_cache_integrity()
    assert report.missing == () and set(report.corrupt) == {f"bad-{i:02d}" for i in range(12)}
    keys = [k for k, _t, _s in batch("good") + batch("bad")]
    got = store.get_many(keys)
    assert sorted(got) == sorted(k for k in keys if k.startswith("good"))
    assert store.lookup(keys).keys() == got.keys()  # the damaged keys are evicted, the others kept
    assert not bad_pack.exists()  # no key named it any more
    assert store.validate_cache_integrity().ok
    store.put_many(batch("bad"))  # fetched again, as a refresh would
    assert len(store.get_many(keys)) == 24


def rewrite_pack(pack: Path, change_table: object = None, change_index: object = None) -> None:
    """Write ``pack`` again with its table and/or its index changed, its recorded checksums left as they were."""
    reader = pq.ParquetFile(pack)
    table, footer = reader.read(), _files.own_meta(reader.metadata.metadata)
    raw = pa.decompress(
        base64.b64decode(footer["pack"]), int(footer["pack_index_bytes"]), "zstd", asbytes=True
    )
    index = json.loads(raw)
    if change_table is not None:
        table = change_table(table)
    if change_index is not None:
        change_index(index)
        raw = json.dumps(index).encode()
        footer["pack"] = base64.b64encode(pa.compress(raw, "zstd", asbytes=True)).decode()
        footer["pack_index_bytes"] = str(len(raw))
    temp = _files.write_temp(pack, table, {}, compression_level=3, footer_only=footer)
    temp.replace(pack)


def test_one_changed_value_in_a_pack_costs_only_the_key_that_holds_it(store: FeatureStore) -> None:
    items = batch("v")
    store.put_many(items)
    [pack] = packs(store)

    def change(table: pa.Table) -> pa.Table:
        column = table.schema.get_field_index("close")
        values = table["close"].to_pylist()
        values[3 * 21 + 5] += 1.0  # a row of v-03
        return table.set_column(column, "close", pa.array(values, table.schema.field("close").type))

    rewrite_pack(pack, change_table=change)
    got = store.get_many([k for k, _t, _s in items])
    assert sorted(got) == sorted(k for k, _t, _s in items if k != "v-03")
    assert all(got[k].equals(t) for k, t, _s in items if k != "v-03")


def test_the_pack_checksum_covers_its_index(store: FeatureStore) -> None:
    # Moving one row from v-00 to v-01 in the index, data unchanged: the row group's checksum no longer matches,
    # so each key is checked on its own and exactly the two whose slices changed are evicted.
    items = batch("i")
    store.put_many(items)
    [pack] = packs(store)

    def change(index: dict[str, list[int]]) -> None:
        index["rows"][0] -= 1
        index["rows"][1] += 1

    rewrite_pack(pack, change_index=change)
    got = store.get_many([k for k, _t, _s in items])
    assert sorted(got) == [k for k, _t, _s in items][2:]


def test_a_pack_whose_keys_all_moved_on_is_removed(store: FeatureStore) -> None:
    store.put_many(batch("c", 6))
    [first] = packs(store)
    changed = [(k, t.slice(0, 20), s) for k, t, s in batch("c", 4)]  # four keys get new content
    store.put_many(changed)
    assert first.exists() and len(packs(store)) == 2  # c-04, c-05 still live in the first pack
    store.put_many([(k, t.slice(0, 19), s) for k, t, s in batch("c", 6)])
    assert not first.exists() and len(packs(store)) == 1
    assert all(store.get(k) == t.slice(0, 19) for k, t, _s in batch("c", 6))
    assert store.validate_cache_integrity().orphans == ()


def test_a_batch_again_with_some_keys_unchanged_leaves_those_where_they_are(store: FeatureStore) -> None:
    [old] = [e.path for e in {e.path: e for e in store.put_many(batch("u", 4))}.values()]
    inode = old.stat().st_ino
    changed = ("u-01", daily("u-01").slice(0, 5), "S1")
    entries = store.put_many([*batch("u", 4)[:1], changed, *batch("u", 4)[2:], *batch("v", 2)])
    # The unchanged keys keep their rows and their pack, untouched; the changed and new ones ride a new pack.
    assert [e.path == old for e in entries] == [True, False, True, True, False, False]
    assert old.stat().st_ino == inode and len(packs(store)) == 2
    again = store.put_many(batch("u", 4)[:1])  # nothing new: no file of its own, no temporary left behind
    assert again[0].path == old and len(packs(store)) == 2 and own_files(store) == []
    assert list(store.root.rglob(f"*{_files.TEMP_SUFFIX}")) == []
    assert store.get("u-01") == changed[1] and store.get("u-02") == daily("u-02")
    assert store.validate_cache_integrity().ok


def test_rebuild_from_files_alone_keeps_the_newest_copy_of_each_key(store: FeatureStore) -> None:
    store.put_many(batch("r", 6))
    store.put_many([(k, t.slice(0, 10), s) for k, t, s in batch("r", 3)])  # r-00..r-02 move to a new pack
    before = store.lookup([k for k, _t, _s in batch("r", 6)])
    store.manifest.path.unlink()
    assert store.rebuild_manifest() == 6
    after = store.lookup(list(before))
    fields = ("path", "pack_offset", "pack_bytes", "rows", "content_hash", "file_size_bytes", "symbol")
    assert {k: [getattr(e, f) for f in fields] for k, e in after.items()} == {
        k: [getattr(e, f) for f in fields] for k, e in before.items()
    }
    assert store.get("r-01") == daily("r-01").slice(0, 10) and store.get("r-05") == daily("r-05")


def age_all(store: FeatureStore, keys: list[str], weeks: int) -> None:
    # Fold the accesses journaled so far first (stats fold): weeks pass after them, not before.
    store.get_cache_stats()
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute(
            "UPDATE entries SET last_accessed_ts = last_accessed_ts - to_weeks(?) WHERE key IN "
            "(SELECT unnest(?::VARCHAR[]))",
            [weeks, keys],
        )


def test_gc_removes_a_pack_only_when_none_of_its_keys_is_left(store: FeatureStore) -> None:
    store.put_many(batch("g", 4))
    [pack] = packs(store)
    age_all(store, ["g-00", "g-01"], 5)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert (report.expired, report.orphans, report.entries_after) == (2, 0, 2) and pack.exists()
    assert store.get("g-03") == daily("g-03") and store.get("g-00") is None
    age_all(store, ["g-02", "g-03"], 5)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert report.expired == 2 and not pack.exists() and store.get_cache_stats().entries == 0


def killed(root: Path, worker: str) -> None:
    """Run ``_workers.<worker>(root)`` in a child process, which SIGKILLs itself."""
    child = subprocess.run(
        [sys.executable, "-c", f"from tests.featurestore._workers import {worker} as d; d({str(root)!r})"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr


def test_sigkill_between_the_pack_and_the_commit_leaves_no_key_and_a_rerun_completes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    FeatureStore(root)
    killed(root, "die_before_commit")
    store = FeatureStore(root)
    keys = [f"k-{i}" for i in range(10)]
    [orphan] = packs(store)  # renamed into place, never recorded
    assert store.lookup(keys) == {} and store.get_many(keys) == {}
    assert store.validate_cache_integrity().orphans == (orphan,)
    store.put_many([(k, daily(k), "S") for k in keys])  # the re-run
    assert (
        all(t.equals(daily(k)) for k, t in store.get_many(keys).items()) and len(store.get_many(keys)) == 10
    )
    collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    report = store.validate_cache_integrity()
    assert report.ok and report.orphans == () and not orphan.exists()


def test_sigkill_inside_the_batched_insert_leaves_the_rows_before_it(tmp_path: Path) -> None:
    """The batch's rows are one INSERT after deleting the rows of the keys it changes, in one transaction: a kill
    after both ran, before COMMIT, leaves every key as it was (none deleted, none doubled) and only an orphan."""
    root = tmp_path / "cache"
    keys = [f"k-{i}" for i in range(10)]
    FeatureStore(root).put_many([(k, daily(k), "S") for k in keys])
    [first] = packs(FeatureStore(root))
    killed(root, "die_inside_the_insert")
    store = FeatureStore(root)
    [orphan] = [p for p in packs(store) if p != first]  # renamed into place, never recorded
    entries = store.lookup(keys)
    assert {k: e.path for k, e in entries.items()} == dict.fromkeys(keys, first)
    assert store.get_many(keys) == {k: daily(k) for k in keys}
    with store.manifest.read() as con:
        assert con.execute("SELECT count(*), count(DISTINCT key) FROM entries").fetchall() == [(10, 10)]
    assert store.validate_cache_integrity().orphans == (orphan,)
    store.put_many([(k, daily(k, 21 + i % 2), "S") for i, k in enumerate(keys)])  # the re-run
    assert store.get_many(keys) == {k: daily(k, 21 + i % 2) for i, k in enumerate(keys)}
    collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    report = store.validate_cache_integrity()
    assert report.ok and report.orphans == () and not orphan.exists() and first.exists()


def test_a_put_of_held_changed_and_new_keys_replaces_exactly_the_changed_rows(store: FeatureStore) -> None:
    """Only the rows of keys the manifest holds with other content are deleted before the batch's INSERT (none
    for a batch of new keys): unchanged keys keep their rows and files, none is recorded twice."""
    old = batch("m", 6)
    first = store.put_many(old)
    again = [(k, daily(k, 22) if i % 2 else t, s) for i, (k, t, s) in enumerate(old)] + batch("n", 3)
    entries = store.put_many(again)
    assert [e.content_hash for e in entries] == [fingerprint_table(t) for _k, t, _s in again]
    assert [e.path for e in entries[:6:2]] == [e.path for e in first[::2]]  # unchanged: left where they were
    assert {e.path for e in entries[1:6:2]} == {e.path for e in entries[6:]} != {first[0].path}
    with store.manifest.read() as con:
        rows = con.execute("SELECT key, content_hash FROM entries ORDER BY key").fetchall()
    assert rows == sorted((e.key, e.content_hash) for e in entries)
    assert store.get_many([k for k, _t, _s in again]) == {k: t for k, t, _s in again}


def test_put_many_hashes_stores_as_put_many_does(tmp_path: Path) -> None:
    """The refresh's put answers content hashes, not entries; the store it leaves is the same, row for row."""
    items = [*batch("h", 8), ("big", daily("big", PACK_MAX_ROWS), "S9"), ("h-03", daily("h-03", 30), "S0")]
    stores = FeatureStore(tmp_path / "entries"), FeatureStore(tmp_path / "hashes")
    entries = stores[0].put_many(items)
    hashes = stores[1].put_many_hashes(items)
    assert (
        hashes == [e.content_hash for e in entries] and hashes[3] == hashes[-1]
    )  # a key given twice: the last
    # Not file_size_bytes: a pack's size varies by a byte or so with its creation time, in its compressed index.
    columns = "key, symbol, start_ts, end_ts, rows, content_hash, hash_method, kind, meta"
    found = []
    for each in stores:
        with each.manifest.read() as con:
            found.append(con.execute(f"SELECT {columns}, pack_offset FROM entries ORDER BY key").fetchall())
    assert found[0] == found[1] and len(found[0]) == 9
    assert stores[1].get_many([k for k, _t, _s in items]) == {k: t for k, t, _s in items}


def test_two_processes_putting_overlapping_batches(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    FeatureStore(root)
    start_at = time.time() + 1.5  # both spawned interpreters have imported by then
    context = multiprocessing.get_context("spawn")
    from tests.featurestore import _workers

    with context.Pool(2) as pool:
        errors = pool.starmap(
            _workers.put_overlapping_batches, [(str(root), start_at, 0, 8), (str(root), start_at, 10, 8)]
        )
    assert errors == [[], []]
    store = FeatureStore(root)
    keys = sorted(
        {f"d-{(first + r * 7 + j) % 90:03d}" for first in (0, 10) for r in range(8) for j in range(30)}
    )
    got = store.get_many(keys)
    assert sorted(got) == keys and all(got[k].equals(daily(k)) for k in keys)
    report = store.validate_cache_integrity()
    assert report.ok and report.orphans == () and report.temporaries == ()


def old_layout(store: FeatureStore) -> None:
    """Make ``store``'s manifest one written before packs: no pack columns, no format row."""
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute("ALTER TABLE entries DROP COLUMN pack_offset")
        con.execute("ALTER TABLE entries DROP COLUMN pack_bytes")
        con.execute("DELETE FROM counters WHERE name = 'store_format'")


def test_a_store_in_the_old_layout_keeps_working(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = FeatureStore(root)
    old = {k: t for k, t, _s in batch("old", 3)}
    for key, table in old.items():
        store.put(key, table, symbol="S")  # one file per key, as before packs
    old_layout(store)
    store = FeatureStore(root)
    assert store.get_many(list(old)) == old
    assert set(store.lookup(list(old))) == set(old)
    with duckdb.connect(str(store.manifest.path), read_only=True) as con:
        assert con.execute("SELECT value FROM counters WHERE name = 'store_format'").fetchall() == [
            (STORE_FORMAT,)
        ]
    # A rewrite of old keys replaces their own files (no pack can shadow them); new keys ride in a pack.
    store.put_many([("old-00", old["old-00"].slice(0, 5), "S"), *batch("new", 3)])
    assert [p.stem for p in own_files(store)] == list(old) and len(packs(store)) == 1
    assert store.get("old-00") == old["old-00"].slice(0, 5) and store.get("new-01") == daily("new-01")
    assert store.validate_cache_integrity().ok


def test_a_store_a_newer_version_wrote_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """The reverse of the migration above: a manifest recording a later format than ``STORE_FORMAT`` (a newer
    featurestore's) was taken for this one's: its first write recorded ``STORE_FORMAT`` over it and every read
    went on reading files whose layout this code does not know (as refresher 9c0c3bf, before packs, took every
    packed key of a format-2 store for corrupt and evicted it). Opening the store now refuses in one line,
    writing nothing: a key with a file of its own was served by ``get`` (which never opens the manifest), and
    recorded in the access journal."""
    root = tmp_path / "cache"
    items = batch("k", 3)
    FeatureStore(root).put_many(items)
    FeatureStore(root).put("own", daily("own"))
    with duckdb.connect(str(root / "manifest.duckdb")) as con:
        con.execute("UPDATE counters SET value = ? WHERE name = 'store_format'", [STORE_FORMAT + 1])
    before = tree(root)
    newer = f"store format {STORE_FORMAT + 1} was written by a newer featurestore"
    with pytest.raises(StoreFormatNewer, match=newer):
        FeatureStore(root).get("own")
    with pytest.raises(StoreFormatNewer, match=newer):
        FeatureStore(root).put_many(batch("n", 2))
    assert tree(root) == before
    done = cli("stats", "--cache-root", str(root))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and newer in done.stderr
    assert tree(root) == before


def test_a_manifest_a_newer_duckdb_wrote_is_refused_not_rebuilt(tmp_path: Path) -> None:
    """A manifest in a DuckDB storage version this DuckDB cannot read was taken for damage: set aside and rebuilt
    from the files, losing every access time and counter (and the newer DuckDB's file). Now one line."""
    root = tmp_path / "cache"
    FeatureStore(root).put("own", daily("own"))
    manifest = root / "manifest.duckdb"
    with duckdb.connect(":memory:") as con:  # the file closed, checkpointed: no WAL beside it
        con.execute(f"ATTACH '{manifest}' AS m")
    assert not manifest.with_name(manifest.name + ".wal").exists()
    later_storage_version(manifest)
    before = tree(root)
    with pytest.raises(StoreFormatNewer, match="newer version of DuckDB") as raised:
        FeatureStore(root).get("own")
    assert "\n" not in str(raised.value) and str(manifest) in str(raised.value)
    done = cli("stats", "--cache-root", str(root))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert tree(root) == before


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``, with a file's bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def later_storage_version(path: Path) -> None:
    """Record a storage version past any this DuckDB reads in both database headers of a DuckDB file (a later
    DuckDB's file), with each header's checksum (DuckDB's: 5381 xor each 8-byte word times a constant)."""
    data = bytearray(path.read_bytes())
    for header in (4096, 8192):
        struct.pack_into("<Q", data, header + 56, 999_999)  # serialization_compatibility
        words = struct.unpack_from("<511Q", data, header + 8)
        checksum = 5381
        for word in words:
            checksum ^= (word * 0xBF58476D1CE4E5B9) % 2**64
        struct.pack_into("<Q", data, header, checksum)
    path.write_bytes(data)


@pytest.mark.parametrize("n", [5, 12])  # a stat per key, or one listing of the keys' directory
def test_a_file_of_its_own_put_meanwhile_never_shadows_the_newer_pack(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    items = batch("m", n)
    write = _writes.write

    def write_then_another_puts(*args: object, **kwargs: object) -> None:
        write(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(_writes, "write", write)
        FeatureStore(store.root).put("m-03", daily("m-03").slice(0, 4))  # a file of its own, committed first

    monkeypatch.setattr(_writes, "write", write_then_another_puts)
    store.put_many(items)
    assert own_files(store) == [] and len(packs(store)) == 1
    assert store.get("m-03") == daily("m-03") and store.get_many(["m-03", "m-04"])["m-03"] == daily("m-03")


@pytest.mark.parametrize("deep", [True, False])
def test_a_truncated_pack_reports_its_keys(store: FeatureStore, deep: bool) -> None:
    store.put_many(batch("t", 5))
    [pack] = packs(store)
    pack.write_bytes(pack.read_bytes()[:100])
    report = store.validate_cache_integrity(deep=deep)
    assert sorted(report.corrupt) == [f"t-{i:02d}" for i in range(5)] and report.orphans == ()


def write_pack_1(root: Path, items: list[tuple[str, pa.Table, str]]) -> Path:
    """A pack as layout ``pack-1`` wrote it (stores on users' disks): the index, offsets included, in the Arrow
    schema metadata (so also inside ``ARROW:schema``), every column dictionary-encoded."""
    created = dt.datetime.now(dt.UTC)
    index: dict[str, list[object] | str] = {"format": "pack-1", "created_ts": created.isoformat()}
    fields = ("content_hash", "hash_method", "symbol", "start_ns", "end_ns", "kind", "entry_kind", "meta")
    columns: dict[str, list[object]] = {name: [] for name in ("key", "offset", "rows", *fields)}
    offset = 0
    for key, table, symbol in items:
        meta = _writes.Batch(
            [key], [table], [symbol], ["{}"], [fingerprint_table(table, "xxh3")], [time_range(table)],
            "xxh3", "arrow", "segment", created,
        ).footer(0)  # fmt: skip
        for name, value in (("key", key), ("offset", offset), ("rows", table.num_rows)):
            columns[name].append(value)
        for name in fields:
            columns[name].append(meta[name])
        offset += table.num_rows
    raw = json.dumps({**index, **columns}, separators=(",", ":")).encode()
    schema_meta = {
        "featurestore.pack": base64.b64encode(pa.compress(raw, codec="zstd", asbytes=True)).decode(),
        "featurestore.pack_index_bytes": str(len(raw)),
        "featurestore.format": "pack-1",
    }
    path = root / "data" / "packs" / "0123456789abcdef0123456789abcdef.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = pa.concat_tables([t for _k, t, _s in items]).replace_schema_metadata(schema_meta)
    pq.write_table(whole, path, compression="zstd", compression_level=3, row_group_size=64 * 1024)
    return path


def test_a_pack_in_layout_pack_1_is_read_checked_rebuilt_and_collected(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    items = batch("v1", 5)
    pack = write_pack_1(root, items)
    assert b"featurestore.pack" in (pq.ParquetFile(pack).schema_arrow.metadata or {})  # really the old layout
    store = FeatureStore(root)
    assert store.rebuild_manifest() == 5
    entries = store.lookup([k for k, _t, _s in items])
    assert [entries[k].pack_offset for k, _t, _s in items] == [21 * i for i in range(5)]
    assert {e.path for e in entries.values()} == {pack} and entries["v1-03"].symbol == "S0"
    assert store.get_many(list(entries)) == {k: t for k, t, _s in items}
    assert store.validate_cache_integrity().ok and store.validate_cache_integrity(deep=False).ok
    report = collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    assert (report.expired, report.orphans, report.entries_after) == (0, 0, 5) and pack.exists()
    store.put_many([(k, t.slice(0, 7), s) for k, t, s in items])  # moved to a new pack, in the new layout
    assert not pack.exists() and all(store.get(k) == t.slice(0, 7) for k, t, _s in items)


def test_a_pack_carries_its_index_once_in_the_footer_not_in_the_arrow_schema(store: FeatureStore) -> None:
    store.put_many(batch("once", 40))
    [pack] = packs(store)
    footer = pq.read_metadata(pack).metadata
    assert _files.own_meta(footer)["format"] == "pack-2"
    index = footer[b"featurestore.pack"]
    assert all(b"featurestore" not in key for key in pq.ParquetFile(pack).schema_arrow.metadata or {})
    assert pack.read_bytes().count(index) == 1 and len(footer[b"ARROW:schema"]) < len(index)


def test_a_pack_encodes_by_column_kind_and_reads_every_kind_back(store: FeatureStore) -> None:
    n = 30
    mixed = pa.table(
        {
            "symbol": ["AAA", "BBB"] * 15,
            "ts": pa.array(range(n), pa.timestamp("ns", tz="UTC")),
            "day": pa.array(range(19_000, 19_000 + n), pa.date32()),
            "big": pa.array([2**64 - 1 - 7 * i for i in range(n)], pa.uint64()),
            "signed": pa.array([(-1) ** i * 2**62 for i in range(n)], pa.int64()),
            "maybe": pa.array([None if i % 3 else i for i in range(n)], pa.int32()),
            "close": [i / 7 for i in range(n)],
            "kind": pa.array(["x", "y", "z"] * 10).dictionary_encode(),
            "flag": [True, False] * 15,
            "pair": [[i, i + 1] for i in range(n)],
        }
    )
    items = [(f"mix-{i}", mixed.slice(i, n - i), "S") for i in range(3)]
    store.put_many(items)
    [pack] = packs(store)
    group = pq.read_metadata(pack).row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert {name for name, used in encodings.items() if "RLE_DICTIONARY" in used} == {"symbol", "kind"}
    assert {name for name, used in encodings.items() if "DELTA_BINARY_PACKED" in used} == {
        "ts", "day", "big", "signed", "maybe"
    }  # fmt: skip
    assert store.get_many([k for k, _t, _s in items]) == {k: t for k, t, _s in items}
