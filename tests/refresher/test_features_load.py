"""Features into a real database: one binary COPY per feature, exact values, NULL warm-up, all or nothing."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from featurestore import FeatureStore
from refresher import database, stamp
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError
from refresher.features import FeatureCounts, get_feature, refresh_features, tables
from refresher.features.cached import daily_frame
from refresher.features.tables import (
    FeaturePart,
    feature_lock_id,
    read_feature_ledger,
    read_ledger,
    replace_feature_rows,
)
from refresher.jobs.retry import is_transient
from refresher.plan import GapPlan
from refresher.profile import Profile, profile_from_file
from refresher.refresh import compute_plan
from refresher.schema import empty_table
from refresher.sources import make_source
from tests.refresher.test_load_batch import held_in_a_copy

pytestmark = pytest.mark.postgres
AS_OF = dt.date(2024, 6, 28)

PROFILE = """\
universe:
  symbols: [{symbols}]
exchange: XNYS
months: 4
timeframes: [1d]
features: [{features}]
seed: {seed}
"""


@pytest.fixture
def conn(pg_database: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    # autocommit, as refresh() connects: each feature's transaction is a real BEGIN/COMMIT.
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "store")


def write_profile(
    tmp_path: Path, symbols: str = "AAA, BBB, CCC", features: str = "dashboard_data", seed: int = 3
) -> Profile:
    path = tmp_path / "profiles" / "feat.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(PROFILE.format(symbols=symbols, features=features, seed=seed))
    return profile_from_file(path, as_of=AS_OF)


def stored_plan(profile: Profile, store: FeatureStore) -> GapPlan:
    """The profile's plan with every segment in the store (features read their bars from there)."""
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
        store.put_many((plan.keys[s], source.fetch(s), s.symbol) for s in plan.to_fetch)
        return compute_plan(profile, source, store, None)


def run(conn: psycopg.Connection[Any], profile: Profile, store: FeatureStore) -> FeatureCounts:
    return refresh_features(conn, profile, store, stored_plan(profile, store))


def table_rows(conn: psycopg.Connection[Any], table: str, symbol: str) -> list[tuple[Any, ...]]:
    return conn.execute(f"SELECT * FROM {table} WHERE symbol = %s ORDER BY date", (symbol,)).fetchall()


def test_rows_equal_the_computation_with_nulls_for_the_warm_up(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    profile = write_profile(tmp_path)
    plan = stored_plan(profile, store)
    counts = refresh_features(conn, profile, store, plan)
    assert counts == FeatureCounts(desired=3, loaded=3, computed=3, rows_loaded=counts.rows_loaded)
    for symbol in ("AAA", "BBB", "CCC"):
        bars = daily_frame(
            list(store.get_many([plan.keys[s] for s in plan.desired if s.symbol == symbol]).values())
        )
        expected = get_feature("dashboard_data").compute(bars)
        got = table_rows(conn, "features_dashboard_data", symbol)
        assert [r[1] for r in got] == [ts.date() for ts in expected.index]
        for row, (_day, values) in zip(got, expected.iterrows(), strict=True):
            for have, want in zip(row[2:], values, strict=True):
                assert have is None if math.isnan(want) else have == pytest.approx(want, rel=1e-12)
        assert got[0][2] is None and got[18][4] is None and got[19][4] is not None
    ledger = conn.execute("SELECT symbol, rows FROM refresher_features ORDER BY symbol").fetchall()
    assert ledger == [(s, len(table_rows(conn, "features_dashboard_data", s))) for s in ("AAA", "BBB", "CCC")]
    assert sum(rows for _s, rows in ledger) == counts.rows_loaded
    assert run(conn, profile, store).loaded == 0


def test_a_failed_copy_leaves_the_feature_as_it_was(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    run(conn, write_profile(tmp_path, "AAA, BBB"), store)
    before = conn.execute("SELECT * FROM features_dashboard_data ORDER BY symbol, date").fetchall()
    ledger = conn.execute("SELECT feature, symbol, input_hash FROM refresher_features ORDER BY 2").fetchall()
    # New bars for every symbol, and the last symbol's rows refused mid-COPY: nothing of the feature may change.
    conn.execute("ALTER TABLE features_dashboard_data ADD CONSTRAINT no_ccc CHECK (symbol <> 'CCC')")
    with pytest.raises(LoadError, match=r"feature dashboard_data: loading failed.*no_ccc") as info:
        run(conn, write_profile(tmp_path, "AAA, BBB, CCC", seed=4), store)
    assert "\n" not in str(info.value) and "; DETAIL:  Failing row contains (CCC," in str(info.value)
    assert conn.execute("SELECT * FROM features_dashboard_data ORDER BY symbol, date").fetchall() == before
    assert (
        conn.execute("SELECT feature, symbol, input_hash FROM refresher_features ORDER BY 2").fetchall()
        == ledger
    )


def loaded_at(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], Any]:
    rows = conn.execute("SELECT feature, symbol, loaded_at FROM refresher_features").fetchall()
    return {(feature, symbol): at for feature, symbol, at in rows}


def test_changing_one_parameter_reloads_exactly_that_feature(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    entries = "trend_analysis, {{name: trend_analysis, as: trend_fast, params: {{fast: {fast}, slow: 30}}}}, etf_metadata"
    profile = write_profile(tmp_path, features=entries.format(fast=10))
    first = run(conn, profile, store)
    assert (first.desired, first.loaded, first.computed) == (9, 9, 9)
    before = loaded_at(conn)
    fast_columns = (
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'features_trend_fast'"
    )
    assert ("sma_10",) in conn.execute(fast_columns).fetchall()

    changed = write_profile(tmp_path, features=entries.format(fast=12))
    hits_before = store.get_cache_stats().hits
    second = run(conn, changed, store)
    assert (second.desired, second.loaded, second.computed) == (9, 3, 3)
    after = loaded_at(conn)
    assert {key for key in after if after[key] != before[key]} == {
        ("trend_fast", s) for s in ("AAA", "BBB", "CCC")
    }
    columns = [c for (c,) in conn.execute(fast_columns).fetchall()]
    assert "sma_12" in columns and "sma_10" not in columns
    plain = conn.execute(
        "SELECT sma_20 FROM features_trend_analysis WHERE symbol = 'AAA' ORDER BY date"
    ).fetchall()
    assert plain[19][0] is not None and plain[18][0] is None

    # Back to the first value: the store still holds those rows, so nothing is computed, one table reloads.
    third = run(conn, profile, store)
    assert (third.loaded, third.computed) == (3, 0)
    assert store.get_cache_stats().hits > hits_before


def ledger_symbols(conn: psycopg.Connection[Any], feature: str) -> list[str]:
    rows = conn.execute(
        "SELECT symbol FROM refresher_features WHERE feature = %s AND rows > 0 ORDER BY 1", (feature,)
    )
    return [symbol for (symbol,) in rows]


def feature_symbols(conn: psycopg.Connection[Any], table: str) -> list[str]:
    return [s for (s,) in conn.execute(f"SELECT DISTINCT symbol FROM {table} ORDER BY 1").fetchall()]


def test_rows_go_when_a_symbols_bars_become_empty(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    profile = write_profile(tmp_path, features="dashboard_data, correlation_analysis")
    run(conn, profile, store)
    assert feature_symbols(conn, "features_dashboard_data") == ["AAA", "BBB", "CCC"]
    # The same profile, but the source now has no bars for CCC (a store of its own, so the entries are new).
    emptied = FeatureStore(tmp_path / "store2")
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, emptied, None)
        emptied.put_many(
            (plan.keys[s], empty_table("1d") if s.symbol == "CCC" else source.fetch(s), s.symbol)
            for s in plan.desired
        )
        plan = compute_plan(profile, source, emptied, None)
    counts = refresh_features(conn, profile, emptied, plan)
    # dashboard_data: only CCC changed; correlation_analysis: every symbol's benchmark changed.
    assert (counts.loaded, counts.pruned) == (2, 2)
    for table in ("dashboard_data", "correlation_analysis"):
        assert feature_symbols(conn, f"features_{table}") == ["AAA", "BBB"]
        assert ledger_symbols(conn, table) == ["AAA", "BBB"]
    assert refresh_features(conn, profile, emptied, plan) == FeatureCounts(desired=6)


def test_prune_removes_symbols_and_features_that_left_the_profile(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    run(conn, write_profile(tmp_path, features="dashboard_data, etf_metadata"), store)
    smaller = write_profile(tmp_path, "AAA, BBB", features="dashboard_data")
    plan = stored_plan(smaller, store)
    # Without --prune the bars of CCC stay in the database, and so do its features (counted as nothing done).
    assert refresh_features(conn, smaller, store, plan) == FeatureCounts(desired=2)
    assert feature_symbols(conn, "features_dashboard_data") == ["AAA", "BBB", "CCC"]
    assert feature_symbols(conn, "features_etf_metadata") == ["AAA", "BBB", "CCC"]

    counts = refresh_features(conn, smaller, store, plan, prune=True)
    assert (counts.loaded, counts.pruned) == (0, 1 + 3)
    assert feature_symbols(conn, "features_dashboard_data") == ["AAA", "BBB"]
    assert ledger_symbols(conn, "dashboard_data") == ["AAA", "BBB"]
    assert conn.execute("SELECT to_regclass('features_etf_metadata')").fetchone() == (None,)
    assert ledger_symbols(conn, "etf_metadata") == []
    assert refresh_features(conn, smaller, store, plan, prune=True) == FeatureCounts(desired=2)


def test_first_loads_of_several_features_into_a_new_database_at_once_all_commit(
    pg_database: ServerInfo,
) -> None:
    # No ledger yet: each load takes only its own feature's lock, and all of them create the ledger.
    rows = pa.table({"symbol": ["AAA"], "date": pa.array([dt.date(2024, 6, 3)], pa.date32()), "x": [1.0]})
    names = [f"first_{i}" for i in range(4)]
    start = threading.Barrier(len(names))

    def load(name: str) -> int:
        with psycopg.connect(pg_database.dsn(), autocommit=True) as own:
            start.wait()
            return replace_feature_rows(own, name, [FeaturePart("AAA", rows, "h")])

    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(load, names)) == [1] * len(names)
    with psycopg.connect(pg_database.dsn()) as check:
        ledger = check.execute("SELECT feature, rows FROM refresher_features ORDER BY 1").fetchall()
    assert ledger == [(name, 1) for name in names]


def test_tables_of_the_same_names_in_another_schema_change_nothing(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # A schema of the user's holding a table named like a feature's (other columns) and a copy of the ledger:
    # the names refresher reads are the ones its statements resolve (the search path), not any table so named.
    conn.execute(
        "CREATE SCHEMA other; CREATE TABLE other.features_dashboard_data (symbol text, date date, zzz float); "
        "CREATE TABLE other.refresher_features (inputs text)"
    )
    profile = write_profile(tmp_path, "AAA, BBB")
    assert run(conn, profile, store).loaded == 2
    columns = (
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s"
    )
    assert conn.execute(columns, ("features_dashboard_data",)).fetchone() == (5,)
    # A ledger from before its ``inputs`` column: added, though the other schema's copy has one.
    conn.execute("ALTER TABLE refresher_features DROP COLUMN inputs")
    assert run(conn, write_profile(tmp_path, "AAA, BBB", seed=4), store).loaded == 2
    assert conn.execute(columns, ("refresher_features",)).fetchone() == (6,)


def test_a_table_of_the_features_name_refresher_did_not_load_is_never_dropped(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # A table of the user's that a feature of the profile is named after: refresher drops only tables its ledger
    # records (as --prune does), and says so in one line.
    conn.execute("CREATE TABLE features_dashboard_data (symbol text, date date, note double precision)")
    conn.execute("INSERT INTO features_dashboard_data VALUES ('MINE', '2024-01-02', 1.5)")
    with pytest.raises(LoadError) as info:
        run(conn, write_profile(tmp_path, "AAA", features="dashboard_data"), store)
    assert str(info.value) == (
        "feature dashboard_data: table features_dashboard_data holds rows refresher did not load, of other "
        "columns: rename or drop it, or give the feature another name (as:)"
    )
    assert conn.execute("SELECT * FROM features_dashboard_data").fetchall() == [
        ("MINE", dt.date(2024, 1, 2), 1.5)
    ]


@contextlib.contextmanager
def counted(conn: psycopg.Connection[Any]) -> Iterator[list[int]]:
    """[statements, rows received] of what ``conn`` executes inside (``conn.execute``, a cursor's execute)."""
    counts = [0, 0]

    class Counting(psycopg.Cursor[Any]):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            super().execute(*args, **kwargs)
            counts[0] += 1
            counts[1] += self.pgresult.ntuples if self.pgresult is not None else 0
            return self

    factory, conn.cursor_factory = conn.cursor_factory, Counting
    try:
        yield counts
    finally:
        conn.cursor_factory = factory


def test_a_noop_refresh_and_the_stamp_read_the_ledger_in_few_round_trips_and_rows(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # Two features of three symbols: six ledger rows, each with its inputs (about 1 KB). A refresh with nothing
    # to do reads them once; the stamp reads a row a feature, never the ledger's (feature, symbol) rows.
    database.ensure_schema(conn)
    profile = write_profile(tmp_path, features="dashboard_data, high_low_detection")
    plan = stored_plan(profile, store)
    assert refresh_features(conn, profile, store, plan).loaded == 6
    with counted(conn) as counts:
        assert refresh_features(conn, profile, store, plan).loaded == 0
    # Whether the ledger is there (1 row), its rows (6), which feature tables exist (2).
    assert counts == [3, 9]
    with counted(conn) as counts:
        tables, state = stamp._stamped_state(conn)
    assert tables == ["features_dashboard_data", "features_high_low_detection"] and state is not None
    # Whether the ledger is there, a row a feature, then TABLES and the symbols digest, the ledger version.
    assert counts == [4, 5]
    # The StaleFeature retry reads hashes alone: no inputs cross the wire.
    assert len(read_feature_ledger(conn).inputs) == 6
    assert read_feature_ledger(conn, inputs=False).inputs == {}
    assert read_ledger(conn) == dict(read_feature_ledger(conn).hashes)


def test_a_reload_asks_the_catalog_about_the_features_table_once(conn: psycopg.Connection[Any]) -> None:
    def part(value: float, input_hash: str) -> FeaturePart:
        rows = pa.table(
            {"symbol": ["AAA"], "date": pa.array([dt.date(2024, 6, 3)], pa.date32()), "x": [value]}
        )
        return FeaturePart("AAA", rows, input_hash)

    assert replace_feature_rows(conn, "mine", [part(1.0, "h1")]) == 1
    with counted(conn) as counts:
        assert replace_feature_rows(conn, "mine", [part(2.0, "h2")]) == 1
    # The ledger's inputs column and its counter, the feature's lock, the table's columns, what the ledger holds of
    # the symbol, the DELETE of its old rows (the COPY and the ledger's upsert are no execute).
    assert counts[0] == 6
    assert conn.execute("SELECT * FROM features_mine").fetchall() == [("AAA", dt.date(2024, 6, 3), 2.0)]


def _one_row(value: float, input_hash: str) -> FeaturePart:
    rows = pa.table({"symbol": ["AAA"], "date": pa.array([dt.date(2024, 6, 3)], pa.date32()), "x": [value]})
    return FeaturePart("AAA", rows, input_hash)


def _loading_one(value: float, input_hash: str) -> Callable[[psycopg.Connection[Any]], int]:
    """A load of feature ``mine``'s one row on the connection given."""
    return lambda conn: replace_feature_rows(conn, "mine", [_one_row(value, input_hash)])


@pytest.fixture
def short_feature_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(tables, "SEGMENT_LOCK_WAIT", 0.5)
    return 0.5


def test_a_feature_load_ends_a_loader_stalled_in_its_copy_and_loads(
    pg_database: ServerInfo, short_feature_wait: float
) -> None:
    """A loader stopped in the COPY of a feature's rows (SIGSTOP, a suspended machine; a refresh, or a worker,
    whose fence another worker's claim ends but a refresh claims none) kept the feature's lock as long as it
    stayed stopped, and a refresh loading that feature waited as long: for ever. Past the wait the session that
    read nothing all along is ended and the lock taken; the stopped loader commits nothing."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        assert replace_feature_rows(conn, "mine", [_one_row(0.0, "h0")]) == 1
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        with held_in_a_copy(pg_database.dsn(), _loading_one(1.0, "h1")) as (_, failed):
            assert replace_feature_rows(conn, "mine", [_one_row(2.0, "h2")]) == 1
        assert len(failed) == 1 and isinstance(failed[0].__cause__, psycopg.OperationalError), failed
        assert conn.execute("SELECT x FROM features_mine").fetchall() == [(2.0,)]
        assert read_ledger(conn) == {("mine", "AAA"): "h2"}


def test_a_live_feature_load_past_the_wait_is_waited_for(
    pg_database: ServerInfo, short_feature_wait: float
) -> None:
    """A load of a feature whose lock another load holds past the wait, its COPY reading rows all along, waits
    for it as before: nothing is ended, both commit, the later one's rows last."""
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        assert replace_feature_rows(conn, "mine", [_one_row(0.0, "h0")]) == 1
        with held_in_a_copy(pg_database.dsn(), _loading_one(1.0, "h1"), live=2.0) as (_, failed):
            assert replace_feature_rows(conn, "mine", [_one_row(2.0, "h2")]) == 1
        assert not failed, failed
        assert read_ledger(conn) == {("mine", "AAA"): "h2"}


def test_a_feature_loader_stopped_between_statements_fails_the_load_in_one_line_naming_it(
    pg_database: ServerInfo, short_feature_wait: float
) -> None:
    """A loader stopped between two statements of a feature's load (idle inside its transaction, the feature's
    lock held) is no COPY to end: the load waits its wait, then fails in one line naming that session, a lock
    timeout (a worker tries it again), where it waited for ever; nothing changes."""
    with (
        psycopg.connect(pg_database.dsn(), autocommit=True) as conn,
        psycopg.connect(pg_database.dsn()) as holder,
    ):
        assert replace_feature_rows(conn, "mine", [_one_row(0.0, "h0")]) == 1
        conn.execute("SET lock_timeout = '30s'")  # before: the load waited here for ever
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (feature_lock_id("mine"),))
        with pytest.raises(
            LoadError, match=r"^feature mine: .* held its lock for over 0.5 s \(pid \d+ "
        ) as caught:
            replace_feature_rows(conn, "mine", [_one_row(2.0, "h2")])
        message = str(caught.value)
        assert f"pid {holder.info.backend_pid} (" in message and "idle in transaction" in message
        assert "\n" not in message and is_transient(caught.value)
        assert read_ledger(conn) == {("mine", "AAA"): "h0"}
