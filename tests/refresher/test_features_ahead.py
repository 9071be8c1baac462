"""A new database's features are computed on a thread while its last segments load
(``refresher.features.ahead``): the same rows as the features step computes itself, used only against an empty
ledger, a failing feature still reported after the others load, and nothing left running after a failure."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from featurestore import FeatureStore
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.errors import FeatureError
from refresher.features import ahead as features_ahead
from refresher.features import refresh_features
from refresher.features.ahead import FeaturesAhead
from refresher.features.cached import FeatureBatch, compute_features
from refresher.jobs import inprocess
from refresher.jobs.inprocess import Fetcher
from refresher.jobs.segment import jobs_of_plan
from refresher.profile import Profile, load_profile
from refresher.refresh import compute_plan, exchange_timezones, refresh
from refresher.segments import Segment
from refresher.sources import make_source, synthetic
from refresher.sources.validate import BadRowsError
from tests.refresher import test_refresh_overlap

pytestmark = pytest.mark.postgres
AS_OF = dt.date(2025, 3, 28)
PROFILE = (
    "universe:\n  symbols: [AAPL, KO, MSFT]\nmonths: 2\ntimeframes: [1d, 1m]\n"
    "features: [{features}]\nseed: 5\n"
)
FEATURES = "full_analysis, performance_metrics"
AHEAD = "refresher-features-ahead"
root = test_refresh_overlap.root  # a world-traversable directory whose servers are stopped after the test


def _profile(root: Path, name: str, features: str = FEATURES) -> Profile:
    (root / "profiles").mkdir(exist_ok=True)
    (root / "profiles" / f"{name}.yaml").write_text(PROFILE.format(features=features))
    return load_profile(str(root / "profiles" / f"{name}.yaml"), [], as_of=AS_OF)


def _features(server: ServerInfo) -> dict[str, Any]:
    """Every feature table's rows and the feature ledger, as text."""
    with psycopg.connect(server.dsn()) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'features\\_%' ORDER BY 1"
            )
        ]
        found: dict[str, Any] = {
            table: conn.execute(f"SELECT t::text FROM {table} t ORDER BY symbol, date").fetchall()
            for table in tables
        }
        found["ledger"] = conn.execute(
            "SELECT feature, symbol, input_hash, rows, inputs FROM refresher_features ORDER BY 1, 2"
        ).fetchall()
    return found


@pytest.fixture
def computed_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads ``compute_features`` ran on, ahead or in the features step."""
    threads: list[str] = []
    original = compute_features

    def recording(*args: Any, **kwargs: Any) -> Iterator[FeatureBatch]:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(features_ahead, "compute_features", recording)
    monkeypatch.setattr("refresher.features.load.compute_features", recording)
    return threads


def test_a_new_database_gets_its_features_computed_ahead_and_the_same_rows_as_the_features_step(
    root: Path, computed_on: list[str]
) -> None:
    profile = _profile(root, "ahead")
    engine = LocalEngine(root / "state")
    assert engine.is_new(profile.name)
    report = refresh(profile, engine, FeatureStore(root / "store"))
    assert computed_on == [AHEAD]  # the features step computed nothing itself
    assert (report.features.desired, report.features.loaded) == (6, 6)
    ahead = _features(engine.start(profile.name))

    # The features step's own computation: a server that runs already is not new.
    computed_on.clear()
    clean = LocalEngine(root / "state-clean")
    clean.start(profile.name)
    again = refresh(profile, clean, FeatureStore(root / "store-clean"))
    assert computed_on == ["MainThread"]
    assert again.features == report.features
    assert _features(clean.start(profile.name)) == ahead
    assert len(ahead["ledger"]) == 6


def test_the_fetcher_says_it_finished_once_its_last_batch_is_stored(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inprocess, "STORE_BATCH", 3)  # several batches
    profile = _profile(root, "fetcher")
    store = FeatureStore(root / "store")
    finished_before: list[bool] = []  # for each batch: the event was set before it was made
    fetch_tables = inprocess.fetch_tables
    fetcher: Fetcher | None = None

    def recording(jobs: Sequence[Any], *args: Any) -> list[tuple[pa.Table, str]]:
        assert fetcher is not None
        finished_before.append(fetcher.finished.is_set())
        return fetch_tables(jobs, *args)

    monkeypatch.setattr(inprocess, "fetch_tables", recording)
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
        jobs = jobs_of_plan(plan, exchange_timezones(profile))
        fetcher = Fetcher(source, store, jobs, [])
        fetcher.start()
        produced = [job for chunk in fetcher.results() for job, _t, _h in chunk]
        assert fetcher.finished.is_set()
        keys = [plan.keys[s] for s in plan.desired]
        assert set(store.lookup_hashes(keys)) == set(keys)  # every segment is in the store
        fetcher.join()
    assert len(produced) == len(jobs) and len(finished_before) > 2 and not any(finished_before)


def test_features_ahead_of_a_store_without_the_bars_give_way_to_the_features_step(root: Path) -> None:
    profile = _profile(root, "missing")
    store = FeatureStore(root / "store")
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
    ready = threading.Event()
    ahead = FeaturesAhead(profile, store, plan, ready)
    ready.set()  # said ready, but no segment was stored: the bars cannot be read from the store
    assert ahead.batches() is None
    waiting = FeaturesAhead(profile, store, plan, threading.Event())
    waiting.cancel()  # a refresh that failed before its daily segments were stored
    assert waiting.batches() is None and not waiting.is_alive()


def _stored(profile: Profile, store: FeatureStore) -> Any:
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
        store.put_many((plan.keys[s], source.fetch(s), s.symbol) for s in plan.to_fetch)
        return compute_plan(profile, source, store, None)


@pytest.fixture
def conn(pg_database: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        yield conn


def _loaded(conn: psycopg.Connection[Any]) -> set[tuple[str, str]]:
    return {(f, s) for f, s in conn.execute("SELECT feature, symbol FROM refresher_features")}


def test_a_failure_computed_ahead_is_raised_after_the_other_features_load(
    root: Path, conn: psycopg.Connection[Any]
) -> None:
    profile = _profile(root, "failing")
    store = FeatureStore(root / "store")
    plan = _stored(profile, store)
    batches = list(compute_features(profile, store, plan))
    failure = FeatureError("performance_metrics", "KO", "ValueError: made up")
    with pytest.raises(FeatureError, match="made up"):
        refresh_features(conn, profile, store, plan, ahead=(batches[:1], failure))
    assert _loaded(conn) == {("full_analysis", s) for s in ("AAPL", "KO", "MSFT")}


def test_batches_computed_ahead_are_not_used_once_the_ledger_holds_features(
    root: Path, conn: psycopg.Connection[Any]
) -> None:
    store = FeatureStore(root / "store")
    first = _profile(root, "first", features="full_analysis")
    refresh_features(conn, first, store, _stored(first, store))
    both = _profile(root, "first")
    # Computed for an empty ledger, which this one is not: the features step computes what the ledger lacks.
    counts = refresh_features(conn, both, store, _stored(both, store), ahead=([], None))
    assert counts.loaded == 3
    assert _loaded(conn) == {
        (f, s) for f in ("full_analysis", "performance_metrics") for s in ("AAPL", "KO", "MSFT")
    }


def test_a_refresh_that_fails_while_features_are_computed_ahead_leaves_no_thread_behind(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = Segment("KO", "1m", dt.date(2025, 3, 1))  # the last month: the fetcher ends with it
    fetch_many = synthetic.SyntheticSource.fetch_many

    def failing(self: synthetic.SyntheticSource, segments: Sequence[Segment]) -> list[pa.Table]:
        if bad in segments:
            raise BadRowsError.first_of(bad, "upstream line 7", "close", -1.0, "close > 0", 1)
        return fetch_many(self, segments)

    started: list[FeaturesAhead] = []

    class Recorded(FeaturesAhead):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(synthetic.SyntheticSource, "fetch_many", failing)
    monkeypatch.setattr(inprocess, "STORE_BATCH", 3)
    monkeypatch.setattr("refresher.refresh.FeaturesAhead", Recorded)
    profile = _profile(root, "bad")
    engine = LocalEngine(root / "state")
    with pytest.raises(BadRowsError):
        refresh(profile, engine, FeatureStore(root / "store"))
    [ahead] = started
    # Told to stop and waited for: nothing computed for a features step that will not come, nothing cached
    # after the error.
    assert ahead.cancelled.is_set() and not ahead.is_alive()
    with psycopg.connect(engine.start(profile.name).dsn()) as conn:
        assert conn.execute("SELECT to_regclass('refresher_features')").fetchone() == (None,)
