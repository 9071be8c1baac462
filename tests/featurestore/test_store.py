"""FeatureStore against real files and a real DuckDB manifest: hits, misses, put/get, stats, clear, corruption."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore import ComputeError, FeatureStore, FeatureStoreError, StoreDiskFull, _files, feature_key
from tests.featurestore.conftest import link_out, make_bars

CONFIG = {"window": 5}


class Counting:
    """A compute function that counts its calls."""

    def __init__(self, as_arrow: bool = False) -> None:
        self.calls = 0
        self.as_arrow = as_arrow

    def __call__(self, raw: pd.DataFrame, config: dict[str, Any]) -> Any:
        self.calls += 1
        out = raw.rolling(config["window"]).mean()
        return pa.Table.from_pandas(out) if self.as_arrow else out


def data_files(store: FeatureStore) -> list[Path]:
    return sorted((store.root / "data").glob("*/*.parquet"))


def segment(values: list[float]) -> pa.Table:
    ts = pa.array(range(len(values)), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "close": values})


def test_miss_then_hit_never_recomputes(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting()
    first = store.get_or_compute("AAPL", bars, CONFIG, compute)
    second = store.get_or_compute("AAPL", bars, dict(CONFIG), compute)
    again = FeatureStore(store.root).get_or_compute("AAPL", bars, CONFIG, compute)
    assert compute.calls == 1
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(second, bars.rolling(5).mean(), check_freq=False)
    assert len(data_files(store)) == 1


def test_arrow_results_come_back_as_arrow(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting(as_arrow=True)
    first = store.get_or_compute("AAPL", bars, CONFIG, compute)
    second = store.get_or_compute("AAPL", bars, CONFIG, compute)
    assert isinstance(second, pa.Table) and second.equals(first)
    assert compute.calls == 1


def test_different_inputs_are_different_entries(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting()
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    store.get_or_compute("MSFT", bars, CONFIG, compute)
    store.get_or_compute("AAPL", bars, {"window": 6}, compute)
    store.get_or_compute("AAPL", bars.tz_convert("America/New_York"), CONFIG, compute)
    assert compute.calls == 4
    assert store.get_cache_stats().entries == 4


def test_stats_count_hits_misses_and_bytes(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting()
    for _ in range(3):
        store.get_or_compute("AAPL", bars, CONFIG, compute)
    store.get("no-such-key")
    stats = store.get_cache_stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 2, 2)
    assert stats.hit_rate == 0.5
    assert stats.bytes == sum(p.stat().st_size for p in data_files(store))
    assert stats.hash_methods == {"xxh3": 1}


def test_manifest_row_describes_the_entry(store: FeatureStore, bars: pd.DataFrame) -> None:
    store.get_or_compute("AAPL", bars, CONFIG, Counting())
    key = feature_key(
        "AAPL", bars, CONFIG, Counting.__call__
    ).key  # identity differs: look the row up instead
    assert key not in store.lookup([key])
    (entry,) = store.lookup([p.stem for p in data_files(store)]).values()
    assert entry.symbol == "AAPL" and entry.rows == len(bars) and entry.hash_method == "xxh3"
    assert entry.start_ts is not None and entry.end_ts is not None
    assert entry.file_size_bytes == entry.path.stat().st_size
    assert pq.read_metadata(entry.path).row_group(0).column(0).compression == "ZSTD"


def test_hits_update_last_accessed(store: FeatureStore) -> None:
    entry = store.put("k1", segment([1.0, 2.0]))
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute("UPDATE entries SET last_accessed_ts = last_accessed_ts - INTERVAL 30 DAY")
    old = store.lookup(["k1"])["k1"].last_accessed_ts
    assert store.get("k1") is not None
    assert store.lookup(["k1"])["k1"].last_accessed_ts > old
    assert store.lookup(["k1"])["k1"].created_ts == entry.created_ts


def test_put_get_roundtrip_and_same_content_is_a_no_op(store: FeatureStore) -> None:
    table = segment([1.0, 2.0, 3.0])
    first = store.put("seg-a", table, symbol="AAPL", meta={"source": "synthetic"})
    mtime = first.path.stat().st_mtime_ns
    second = store.put("seg-a", segment([1.0, 2.0, 3.0]), symbol="AAPL")
    assert second == first and first.path.stat().st_mtime_ns == mtime
    got = store.get("seg-a")
    assert got is not None and got.equals(table)
    replaced = store.put("seg-a", segment([9.0]), symbol="AAPL")
    assert replaced.content_hash != first.content_hash and replaced.rows == 1
    assert store.get("seg-a") == segment([9.0])


def test_nested_columns_survive_the_content_hash_check(store: FeatureStore) -> None:
    """Parquet reads a list's item back as ``element`` (Arrow writes ``item``): the read must still verify."""
    table = pa.table(
        {
            "examples": pa.array([["line 3", "line 9"], [], None], pa.list_(pa.string())),
            "fixed": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int64(), 2)),
            "nested": pa.array(
                [[{"a": [1]}], [], [{"a": None}]], pa.list_(pa.struct([("a", pa.list_(pa.int64()))]))
            ),
            "tags": pa.array([[("k", 1)], [], None], pa.map_(pa.string(), pa.int64())),
        }
    )
    entry = store.put("seg-nested", table, symbol="AAPL")
    got = store.get("seg-nested")
    assert got is not None and got.to_pylist() == table.to_pylist()
    assert store.lookup(["seg-nested"])["seg-nested"].content_hash == entry.content_hash  # not evicted
    assert store.validate_cache_integrity().ok


def test_put_many_get_many_lookup(store: FeatureStore) -> None:
    items = [(f"seg-{i}", segment([float(i)] * (i + 1)), "SYM") for i in range(20)]
    entries = store.put_many(items)
    assert [e.key for e in entries] == [k for k, _t, _s in items]
    found = store.lookup([f"seg-{i}" for i in range(25)])
    assert set(found) == {k for k, _t, _s in items}
    assert found["seg-3"] == entries[3]
    got = store.get_many(["seg-1", "seg-4", "missing"])
    assert set(got) == {"seg-1", "seg-4"} and got["seg-1"].equals(segment([1.0, 1.0]))
    [pack] = {entry.path for entry in entries}  # small tables of one batch: one file
    os.unlink(pack)  # lookup reads the manifest only, never the files
    assert "seg-4" in store.lookup(["seg-4"])
    assert store.get_many(["seg-1", "seg-4", "missing"]) == {}


def test_bad_keys_and_tables_are_rejected(store: FeatureStore) -> None:
    for bad in ("../escape", ".hidden", "", "a/b"):
        with pytest.raises(FeatureStoreError, match="key="):
            store.put(bad, segment([1.0]))
    with pytest.raises(FeatureStoreError, match="table="):
        store.put("ok", [1, 2, 3])  # type: ignore[arg-type]


def test_clear_cache_by_symbol_and_all(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting()
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    store.get_or_compute("MSFT", bars, CONFIG, compute)
    assert store.clear_cache(symbol="AAPL") == 1
    assert [e.symbol for e in store.lookup([p.stem for p in data_files(store)]).values()] == ["MSFT"]
    assert len(data_files(store)) == 1
    assert store.clear_cache() == 1
    assert data_files(store) == [] and store.get_cache_stats().entries == 0
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    assert compute.calls == 3


def test_clear_cache_never_deletes_through_a_directory_linked_out_of_the_store(
    store: FeatureStore, tmp_path: Path
) -> None:
    """A data directory replaced by a symbolic link to another place: clear removed the files there (as GC did
    before it learnt not to). The rows go; those files stay."""
    entry = store.put("seg", segment([1.0]))
    elsewhere = link_out(entry.path.parent, tmp_path / "elsewhere")
    assert store.clear_cache() == 1 and store.lookup(["seg"]) == {}
    assert [p.name for p in elsewhere.iterdir()] == [entry.path.name]  # before: []


def test_a_corrupt_file_through_a_directory_linked_out_of_the_store_is_evicted_not_deleted(
    store: FeatureStore, tmp_path: Path
) -> None:
    entry = store.put("seg", segment([1.0] * 1000))
    elsewhere = link_out(entry.path.parent, tmp_path / "elsewhere")
    (elsewhere / entry.path.name).write_bytes(entry.path.read_bytes()[:-100])
    assert store.get("seg") is None and store.lookup(["seg"]) == {}  # evicted as before
    assert [p.name for p in elsewhere.iterdir()] == [entry.path.name]  # before: []


def test_failing_compute_caches_nothing(store: FeatureStore, bars: pd.DataFrame) -> None:
    def boom(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
        raise ZeroDivisionError("bad window")

    with pytest.raises(ZeroDivisionError, match="bad window") as info:
        store.get_or_compute("AAPL", bars, CONFIG, boom)
    assert any("nothing cached" in note for note in info.value.__notes__)

    def wrong(raw: pd.DataFrame, config: dict[str, Any]) -> Any:
        return [1, 2, 3]

    with pytest.raises(ComputeError, match="returned list"):
        store.get_or_compute("AAPL", bars, CONFIG, wrong)
    assert data_files(store) == [] and store.get_cache_stats().entries == 0
    assert list((store.root / "data").glob("*/.*")) == []  # no temporary left behind either


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_evicted_and_recomputed(store: FeatureStore, damage: str) -> None:
    bars = make_bars(20_000)
    compute = Counting()
    expected = store.get_or_compute("AAPL", bars, CONFIG, compute)
    (path,) = data_files(store)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    got = store.get_or_compute("AAPL", bars, CONFIG, compute)
    assert compute.calls == 2
    pd.testing.assert_frame_equal(got, expected)
    assert store.validate_cache_integrity().ok
    assert store.get(path.stem) is not None


def test_corrupt_segment_get_returns_none_and_evicts(store: FeatureStore) -> None:
    entry = store.put("seg", segment([1.0] * 1000))
    entry.path.write_bytes(entry.path.read_bytes()[:-100])
    report = store.validate_cache_integrity()
    assert report.corrupt == ("seg",) and not report.ok
    assert store.get("seg") is None
    assert store.lookup(["seg"]) == {} and not entry.path.exists()


def test_validate_reports_missing_files_and_orphans(store: FeatureStore) -> None:
    entry = store.put("seg", segment([1.0]))
    store.put("other", segment([2.0]))
    entry.path.unlink()
    (store.root / "data" / "zz").mkdir()
    (store.root / "data" / "zz" / "zzorphan.parquet").write_bytes(b"x")
    report = store.validate_cache_integrity()
    assert report.missing == ("seg",) and report.corrupt == () and not report.ok
    assert [p.name for p in report.orphans] == ["zzorphan.parquet"]


def test_rebuild_manifest_restores_rows_from_files(store: FeatureStore, bars: pd.DataFrame) -> None:
    store.put_many([(f"seg-{i}", segment([float(i)]), "SYM") for i in range(5)])
    store.get_or_compute("AAPL", bars, CONFIG, Counting())
    own_files = [p.stem for p in data_files(store) if p.parent.name != "packs"]
    before = store.lookup([f"seg-{i}" for i in range(5)] + own_files)
    assert len(before) == 6 and len(own_files) == 1  # the five segments ride in one pack
    store.manifest.path.unlink()

    def described(entries: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (e.symbol, e.rows, e.content_hash, e.start_ts, e.file_size_bytes, e.path, e.pack_offset)
            for k, e in entries.items()
        }

    # A deleted manifest is restored from the files on first use, then rebuilt again on demand.
    assert described(store.lookup(list(before))) == described(before)
    assert store.rebuild_manifest() == 6
    assert described(store.lookup(list(before))) == described(before)


def test_footer_hashing_is_explicit(tmp_path: Path, bars: pd.DataFrame) -> None:
    store = FeatureStore(tmp_path / "footer", hash_method="footer")
    compute = Counting()
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    assert compute.calls == 1 and store.get_cache_stats().hash_methods == {"footer": 1}
    with pytest.raises(FeatureStoreError, match="hash_method='sha1'"):
        FeatureStore(tmp_path / "x", hash_method="sha1")  # type: ignore[arg-type]


def test_root_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURE_STORE_PATH", str(tmp_path / "from-env"))
    assert FeatureStore().root == tmp_path / "from-env"
    monkeypatch.delenv("FEATURE_STORE_PATH")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert FeatureStore().root == tmp_path / "home" / ".feature_cache"


def test_warm_cache_computes_only_missing(store: FeatureStore, bars: pd.DataFrame) -> None:
    compute = Counting()
    store.get_or_compute("AAPL", bars, CONFIG, compute)
    report = store.warm_cache([("AAPL", bars, CONFIG), ("MSFT", bars, CONFIG)], compute)
    assert (report.requested, report.computed, report.hits) == (2, 1, 1)
    store.get_or_compute("MSFT", bars, CONFIG, compute)
    assert compute.calls == 2


def test_get_or_compute_many_matches_one_by_one_and_shares_its_keys(store: FeatureStore) -> None:
    frames = {f"S{i}": make_bars(200, seed=i) for i in range(5)}
    jobs = [(symbol, frame, CONFIG) for symbol, frame in frames.items()]
    jobs.append(("S0", frames["S0"], dict(CONFIG)))  # the same key twice in one batch: computed once
    compute = Counting()
    results = store.get_or_compute_many(jobs, compute)
    assert compute.calls == 5
    for (_symbol, frame, _config), result in zip(jobs, results, strict=True):
        pd.testing.assert_frame_equal(result, frame.rolling(5).mean(), check_freq=False)
    # One by one finds what the batch stored (same keys), and a second batch computes nothing.
    one = store.get_or_compute("S3", frames["S3"], CONFIG, compute)
    pd.testing.assert_frame_equal(one, results[3])
    store.get_or_compute_many(jobs, compute)
    assert compute.calls == 5
    stats = store.get_cache_stats()
    assert (stats.entries, stats.misses) == (5, 5)
    assert store.validate_cache_integrity().ok


def test_get_or_compute_many_caches_nothing_when_a_computation_fails(store: FeatureStore) -> None:
    calls = Counting()

    def failing_on_s2(raw: pd.DataFrame, config: dict[str, Any]) -> Any:
        if len(raw) == 120:
            raise ValueError("boom")
        return calls(raw, config)

    jobs = [("S1", make_bars(100), CONFIG), ("S2", make_bars(120), CONFIG)]
    with pytest.raises(ValueError, match="boom"):
        store.get_or_compute_many(jobs, failing_on_s2)
    assert store.get_cache_stats().entries == 0 and data_files(store) == []


def test_put_many_fsyncs_every_file_before_any_is_published_and_every_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsyncs of a batch run together (``_files.fsync_paths``), but in the order a crash needs: each file's
    data before any rename makes a file visible, each directory after its renames, all before the manifest row."""
    store = FeatureStore(tmp_path / "cache", pack_max_rows=0)  # every table in a file of its own
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    keys = [f"seg-{symbol}" for symbol in ("AAPL", "KO", "MSFT", "NVDA")]
    store.put_many([(key, segment([1.0, 2.0, float(k)]), None) for k, key in enumerate(keys)])
    monkeypatch.undo()

    files = [entry.path for entry in store.lookup(keys).values()]
    renamed = [i for i, (kind, path) in enumerate(events) if kind == "rename" and Path(path) in files]
    assert len(renamed) == len(files)
    synced_temps = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.endswith(".tmp")]
    assert len(synced_temps) == len(files) and max(synced_temps) < min(renamed)
    for directory in {path.parent for path in files}:
        synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and Path(path) == directory]
        assert synced and max(synced) > max(renamed)


def test_a_file_of_its_own_has_dictionaries_for_strings_only(tmp_path: Path) -> None:
    """As in packs: prices are nearly all distinct, a dictionary for them costs time and bytes."""
    store = FeatureStore(tmp_path / "cache", pack_max_rows=0)
    table = pa.table({"symbol": ["AAPL"] * 100, "close": [float(i) for i in range(100)]})
    store.put("seg-AAPL", table)
    [entry] = store.lookup(["seg-AAPL"]).values()
    columns = pq.ParquetFile(entry.path).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(2)}
    assert any("DICTIONARY" in e for e in encodings["symbol"])
    assert not any("DICTIONARY" in e for e in encodings["close"])
    assert store.get("seg-AAPL") == table


def test_stored_files_and_packs_carry_no_page_statistics(tmp_path: Path) -> None:
    """Nothing reads a page's min/max (whole files, or a pack's row groups by its index): not computed."""
    store = FeatureStore(tmp_path / "cache", pack_max_rows=50)
    wide = pa.table({"symbol": ["AAPL"] * 100, "close": [float(i) for i in range(100)]})
    small = [pa.table({"symbol": [s] * 3, "close": [1.0, 2.0, 3.0]}) for s in ("A", "B")]
    store.put_many([("seg-AAPL", wide, "AAPL"), ("seg-A", small[0], "A"), ("seg-B", small[1], "B")])
    entries = store.lookup(["seg-AAPL", "seg-A"])
    assert entries["seg-A"].pack_offset is not None and entries["seg-AAPL"].pack_offset is None
    for entry in entries.values():
        group = pq.ParquetFile(entry.path).metadata.row_group(0)
        assert not any(group.column(i).is_stats_set for i in range(group.num_columns))
    assert store.get_many(["seg-AAPL", "seg-A", "seg-B"]) == {
        "seg-AAPL": wide,
        "seg-A": small[0],
        "seg-B": small[1],
    }


def test_a_failed_write_in_a_batch_leaves_no_temporary_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's files are written on several threads: when one fails, the others' temporaries (written or
    not yet) are still removed, and nothing of the batch is recorded."""
    store = FeatureStore(tmp_path / "cache", pack_max_rows=0)
    write_temp = _files.write_temp

    def failing(final: Path, table: pa.Table, *args: Any, **kwargs: Any) -> Path:
        if "KO" in final.name:
            raise OSError(28, "No space left on device")
        return write_temp(final, table, *args, **kwargs)

    monkeypatch.setattr(_files, "write_temp", failing)
    keys = [f"seg-{symbol}" for symbol in ("AAPL", "KO", "MSFT", "NVDA", "XOM")]
    with pytest.raises(StoreDiskFull, match="No space left"):  # one line (test_diskfull), not the OSError
        store.put_many([(key, segment([1.0, float(k)]), None) for k, key in enumerate(keys)])
    assert list((store.root / "data").rglob("*.tmp")) == []
    assert store.lookup(keys) == {}


def test_a_root_that_is_a_file_or_under_one_is_one_line(tmp_path: Path) -> None:
    # FEATURE_STORE_PATH (or --store) naming a file was a NotADirectoryError traceback from every command
    afile = tmp_path / "store.txt"
    afile.write_text("")
    for root, culprit in ((afile, afile / "data"), (afile / "sub", afile / "sub" / "data")):
        with pytest.raises(FeatureStoreError) as info:
            FeatureStore(root)
        assert str(info.value) == f"root={str(root)!r}: cannot hold a store: {culprit} (Not a directory)"
        assert info.value.exit_code == 2
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "key-locks").write_text("")  # a file where the store keeps its lock files
    with pytest.raises(FeatureStoreError, match=r"cannot hold a store: .*key-locks \(File exists\)"):
        FeatureStore(tmp_path / "cache")


def test_a_file_copied_over_another_keys_is_never_served_as_it(store: FeatureStore) -> None:
    """Another key's file copied over this key's by hand is whole and matches its own content hash: it was served
    as this key's table, and verify and gc found nothing wrong with it (but its size, for the quick checks). Now
    the file's own key is checked: evicted on read, corrupt to verify, removed by gc."""
    from featurestore import collect_garbage

    a, b = store.put("seg-a", segment([1.0] * 1000)), store.put("seg-b", segment([2.0] * 1000))
    b.path.write_bytes(a.path.read_bytes())
    assert store.validate_cache_integrity().corrupt == ("seg-b",)
    assert store.validate_cache_integrity(deep=False).corrupt == ("seg-b",)
    assert collect_garbage(store, retention=dt.timedelta(weeks=4), dry_run=True).corrupt == 1
    assert store.get("seg-b") is None  # fails before: seg-a's table, 1.0 for 2.0
    assert store.lookup(["seg-b"]) == {} and not b.path.exists()
    assert store.get("seg-a") == segment([1.0] * 1000)


def test_files_gone_names_the_keys_whose_file_or_pack_was_deleted_by_hand(tmp_path: Path) -> None:
    """A file deleted by hand keeps its manifest row (a read that misses it evicts nothing): ``files_gone`` names
    its key, and every key of a deleted pack, by a ``stat`` each, no file read; a damaged file is not gone."""
    store = FeatureStore(tmp_path / "store")
    store.put_many([(f"own-{n}", segment([float(n)] * 3), None) for n in range(2)])  # one batch: a pack
    store.put_many([("alone", segment([1.0] * 3), None)])
    store.put_many([("kept", segment([2.0] * 3), None)])
    entries = store.lookup(["own-0", "own-1", "alone", "kept"])
    assert entries["own-0"].pack_offset is not None and entries["own-0"].path == entries["own-1"].path
    assert store.files_gone(list(entries)) == set()
    entries["alone"].path.unlink()
    assert store.files_gone(list(entries)) == {"alone"}
    assert store.get("alone") is None and store.files_gone(["alone", "never-stored"]) == {"alone"}  # row kept
    entries["own-0"].path.unlink()
    entries["kept"].path.write_bytes(b"not parquet")  # damaged, not gone: a read finds it (and evicts it)
    assert store.files_gone(list(entries)) == {"alone", "own-0", "own-1"}
