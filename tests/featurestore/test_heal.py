"""A store that heals itself: the Parquet files are the truth, an unreadable or lost manifest is rebuilt from them."""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

from featurestore import FeatureStore, StoreFormatNewer, collect_garbage
from featurestore import manifest as manifest_module
from featurestore import store as store_module
from tests.featurestore import _workers

DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda data: b"this is not a duckdb file\n" * 200,
    "empty": lambda data: b"",
    "truncated-header": lambda data: data[:100],
    "truncated-half": lambda data: data[: len(data) // 2],
    "zeroed-block": lambda data: data[:8192] + bytes(4096) + data[8192 + 4096 :],
}


def filled(root: Path) -> tuple[FeatureStore, dict[str, pa.Table], pd.DataFrame]:
    store = FeatureStore(root)
    tables = {f"seg-{i}": pa.table({"x": list(range(i, i + 50))}) for i in range(20)}
    store.put_many([(key, table, "SYM") for key, table in tables.items()])
    feature = store.get_or_compute("AAPL", _bars(), {"w": 3}, _rolling)
    assert isinstance(feature, pd.DataFrame)
    return store, tables, feature


def _bars() -> pd.DataFrame:
    index = pd.date_range("2024-01-02", periods=30, freq="D", tz="UTC")
    return pd.DataFrame({"close": [float(i) for i in range(30)]}, index=index)


COMPUTED: list[int] = []  # one item per call of _rolling, in this process


def _rolling(raw: pd.DataFrame, config: dict[str, int]) -> pd.DataFrame:
    COMPUTED.append(config["w"])
    return raw.rolling(config["w"]).mean()


def damage(store: FeatureStore, how: str) -> None:
    path = store.manifest.path
    path.write_bytes(DAMAGES[how](path.read_bytes()))


def assert_healed(store: FeatureStore, tables: dict[str, pa.Table]) -> None:
    report = store.validate_cache_integrity()
    assert report.ok and report.checked == len(tables) + 1 and report.orphans == ()
    found = store.get_many(list(tables))
    assert {key: t.column("x").to_pylist() for key, t in found.items()} == {
        key: t.column("x").to_pylist() for key, t in tables.items()
    }


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_damaged_manifest_is_set_aside_and_rebuilt_with_one_line(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, tables, feature = filled(tmp_path / "cache")
    damage(store, how)
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        fresh = FeatureStore(store.root)
        assert_healed(fresh, tables)
    warnings = [r.getMessage() for r in caplog.records if r.name == "featurestore"]
    if how != "truncated-half":  # DuckDB reads a manifest cut after its last used block as whole
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert "unreadable" in warnings[0] and "rebuilt from the data files" in warnings[0]
        assert len(list(store.root.glob("manifest.duckdb.damaged-*"))) == 1
    # The feature's row came back from its file: a hit, not a recomputation.
    computed = len(COMPUTED)
    pd.testing.assert_frame_equal(fresh.get_or_compute("AAPL", _bars(), {"w": 3}, _rolling), feature)
    assert len(COMPUTED) == computed


@pytest.mark.parametrize("how", ["garbage", "truncated-header", "zeroed-block"])
def test_validate_and_rebuild_never_raise_on_a_damaged_manifest(tmp_path: Path, how: str) -> None:
    store, tables, _feature = filled(tmp_path / "cache")
    damage(store, how)
    assert store.validate_cache_integrity().ok
    damage(store, how)
    assert store.rebuild_manifest() == len(tables) + 1
    assert_healed(store, tables)


def _replace_manifest(store: FeatureStore, sql: str) -> None:
    store.manifest.path.unlink()
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute(sql)


@pytest.mark.parametrize(
    "tables",
    [
        "CREATE TABLE entries (key VARCHAR, tier INTEGER NOT NULL)",
        "CREATE TABLE entries (key VARCHAR); CREATE TABLE counters (name VARCHAR)",
    ],
)
def test_a_duckdb_file_of_another_layout_is_set_aside_and_rebuilt(
    tmp_path: Path, tables: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole DuckDB file whose tables lack the manifest's columns (another program's) opened without error,
    and every command then ended in a Binder Error traceback: nothing healed it."""
    store, stored, _feature = filled(tmp_path / "cache")
    _replace_manifest(store, tables)
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        fresh = FeatureStore(store.root)
        assert_healed(fresh, stored)  # fails before: BinderException, column "path" not found
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "featurestore"]
    assert "not a manifest: no column" in warning and "rebuilt from the data files" in warning


def test_a_newer_featurestores_manifest_of_another_layout_is_refused_not_set_aside(tmp_path: Path) -> None:
    """The check above must not take a newer format's manifest, whatever its columns, for damage."""
    store, _stored, _feature = filled(tmp_path / "cache")
    _replace_manifest(
        store,
        "CREATE TABLE entries (key VARCHAR, renamed VARCHAR); CREATE TABLE counters (name VARCHAR, value BIGINT);"
        " INSERT INTO counters VALUES ('store_format', 3)",
    )
    with pytest.raises(StoreFormatNewer, match="store format 3"):
        FeatureStore(store.root)
    assert list(store.root.glob("manifest.duckdb.damaged-*")) == []


def _add_column(store: FeatureStore, column: str, *, store_format: int | None = None) -> None:
    """The store's own manifest, every row kept, with one more column in ``entries`` (another tool's variant)."""
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute(f"CREATE TABLE wider AS SELECT *, 'hot' AS {column.split()[0]} FROM entries")
        con.execute("DROP TABLE entries")
        con.execute("CREATE TABLE entries AS SELECT * FROM wider WITH NO DATA")
        con.execute(f"ALTER TABLE entries DROP COLUMN {column.split()[0]}")
        con.execute(f"ALTER TABLE entries ADD COLUMN {column}")
        con.execute("INSERT INTO entries SELECT * FROM wider")
        con.execute("DROP TABLE wider")
        if store_format is not None:
            con.execute("UPDATE counters SET value = ? WHERE name = 'store_format'", [store_format])


@pytest.mark.parametrize(
    "column", ["tier VARCHAR NOT NULL", "tier VARCHAR", "tier VARCHAR NOT NULL DEFAULT 'x'"]
)
def test_a_manifest_with_a_column_this_code_cannot_fill_is_set_aside_and_rebuilt(
    tmp_path: Path, column: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every column of ours and one more, NOT NULL without a default: it opened whole and every put ended in a
    ConstraintException traceback (shown as "Current transaction is aborted"), at every run. Of a format this
    code writes, it is another layout: set aside and rebuilt with one line. A column a put can leave to NULL
    or its default is no obstacle: that manifest is kept, access times and all."""
    store, stored, _feature = filled(tmp_path / "cache")
    _add_column(store, column)
    fillable = "NOT NULL" not in column or "DEFAULT" in column
    with caplog.at_level(logging.WARNING, logger="featurestore"):
        fresh = FeatureStore(store.root)
        fresh.put("seg-new", pa.table({"x": [7]}))  # fails before with the unfillable column: the traceback
        assert_healed(fresh, {**stored, "seg-new": pa.table({"x": [7]})})
    warnings = [r.getMessage() for r in caplog.records if r.name == "featurestore"]
    aside = list(store.root.glob("manifest.duckdb.damaged-*"))
    if fillable:
        assert (warnings, aside) == ([], [])
        return
    (warning,) = warnings
    assert (
        "(not this featurestore's layout: column entries.tier is NOT NULL without a default); moved to"
        in warning
    )
    assert len(aside) == 1


def test_a_newer_featurestores_manifest_with_a_column_this_code_cannot_fill_is_refused(
    tmp_path: Path,
) -> None:
    """A newer store format that adds a NOT NULL column is refused, as every newer format: never set aside."""
    store, _stored, _feature = filled(tmp_path / "cache")
    _add_column(store, "tier VARCHAR NOT NULL", store_format=3)
    # The check at open, then a put's own under the lock (as in a process that opened the store earlier).
    for _ in range(2):
        with pytest.raises(StoreFormatNewer, match="store format 3"):
            FeatureStore(store.root).put("seg-new", pa.table({"x": [7]}))
        manifest_module._NOT_NEWER.clear()
    with pytest.raises(StoreFormatNewer, match="store format 3"):
        store.put("seg-new", pa.table({"x": [7]}))
    assert list(store.root.glob("manifest.duckdb.damaged-*")) == []


def test_deleted_manifest_is_rebuilt_on_first_use_and_files_are_not_orphans(tmp_path: Path) -> None:
    store, tables, _feature = filled(tmp_path / "cache")
    stats = store.get_cache_stats()
    store.manifest.path.unlink()
    # The same object, still open: its next read restores the rows before serving any file.
    assert set(store.lookup(list(tables))) == set(tables)
    assert store.get_cache_stats().entries == stats.entries
    assert_healed(store, tables)
    store.manifest.path.unlink()
    assert FeatureStore(store.root).validate_cache_integrity().orphans == ()


def test_a_hit_after_the_manifest_was_deleted_has_a_row(tmp_path: Path) -> None:
    store, _tables, _feature = filled(tmp_path / "cache")
    store.manifest.path.unlink()
    computed = len(COMPUTED)
    store.get_or_compute("AAPL", _bars(), {"w": 3}, _rolling)
    assert len(COMPUTED) == computed  # served from its file...
    assert store.manifest.path.exists()  # ...and only after the manifest was restored, so it has a row
    assert store.validate_cache_integrity().orphans == ()


@pytest.mark.slow
def test_two_processes_finding_the_damage_at_once_heal_it_once(tmp_path: Path) -> None:
    store, tables, _feature = filled(tmp_path / "cache")
    damage(store, "garbage")
    start_at = time.time() + 1.5  # both children past their imports, then they open the store together
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        found = pool.starmap(
            _workers.heal_and_read, [(str(store.root), start_at, list(tables)) for _ in range(4)]
        )
    assert found == [len(tables)] * 4
    assert len(list(store.root.glob("manifest.duckdb.damaged-*"))) == 1
    assert_healed(store, tables)


def test_a_manifest_created_but_never_filled_is_filled_by_the_next_writer(tmp_path: Path) -> None:
    store, tables, _feature = filled(tmp_path / "cache")
    store.manifest.path.unlink()
    # What a process killed between creating the file and committing its rows leaves: the tables, no rows.
    con = duckdb.connect(str(store.manifest.path))
    con.execute(manifest_module._SCHEMA)
    con.close()
    assert_healed(FeatureStore(store.root), tables)


_HEAL_CHILD = "import sys; from featurestore import FeatureStore; FeatureStore(sys.argv[1]); print('healed')"


@pytest.mark.slow
def test_sigkill_while_healing_leaves_a_store_the_next_process_heals(tmp_path: Path) -> None:
    store, tables, _feature = filled(tmp_path / "cache")
    more = {f"more-{i}": pa.table({"x": list(range(i, i + 50))}) for i in range(300)}
    store.put_many([(key, table, "SYM") for key, table in more.items()])
    tables.update(more)
    rng = random.Random(3)
    for _ in range(5):
        damage(store, "garbage")
        with subprocess.Popen(
            [sys.executable, "-c", _HEAL_CHILD, str(store.root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as child:
            time.sleep(rng.uniform(0.3, 2.0))  # before, during or after the rebuild
            child.send_signal(signal.SIGKILL)
            child.communicate()
    assert_healed(FeatureStore(store.root), tables)


@pytest.mark.parametrize("loss", ["damaged", "deleted"])
def test_a_rebuilt_manifest_does_not_expire_keys_in_use(
    tmp_path: Path, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Access times live only in the manifest. A rebuild took each file's creation time for its last access, so
    # the first nightly GC after a heal deleted every key written more than the retention ago, in use or not.
    store = FeatureStore(tmp_path / "cache")
    written = manifest_module.utc_now() - dt.timedelta(weeks=8)
    monkeypatch.setattr(store_module, "utc_now", lambda: written)
    store.put_many([("old-but-used", pa.table({"x": [1, 2]}), "SYM")])
    monkeypatch.undo()
    assert store.get("old-but-used") is not None
    store.lookup(["old-but-used"])  # folds the hit into the manifest
    if loss == "damaged":
        damage(store, "garbage")
    else:
        store.manifest.path.unlink()
    report = collect_garbage(FeatureStore(store.root), retention=dt.timedelta(weeks=4))
    assert report.expired == 0
    assert FeatureStore(store.root).get("old-but-used") is not None
