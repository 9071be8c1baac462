"""The daily refresh of features: one more session appends rows instead of reloading each symbol, and what it
leaves equals a clean load, for every registered feature, after a kill -9 at any step, and with two at once."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

import refresher.features.load as features_load
from featurestore import FeatureStore
from refresher.engines.base import ServerInfo
from refresher.features import FEATURES, refresh_features
from refresher.features.cached import compute_features
from refresher.features.tables import StaleFeature, read_feature_ledger, read_ledger, replace_feature_rows
from refresher.plan import GapPlan
from refresher.profile import Profile, profile_from_file
from tests.refresher.test_features_load import conn, store, stored_plan

__all__ = ["conn", "store"]  # fixtures, imported to be found
pytestmark = pytest.mark.postgres
# A Thursday, then the Friday after it: the daily refresh adds one session to June.
BEFORE, AFTER, LATER = dt.date(2024, 6, 20), dt.date(2024, 6, 21), dt.date(2024, 6, 24)

PROFILE = """\
universe:
  symbols: [AAA, BBB, CCC]
exchange: XNYS
months: {months}
timeframes: [1d, 1m]
features: [{features}]
seed: 11
"""


def profile_at(root: Path, as_of: dt.date, features: str, months: int = 3) -> Profile:
    path = root / "profiles" / "daily.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PROFILE.format(features=features, months=months))
    return profile_from_file(path, as_of=as_of)


def state(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every feature table's rows and the ledger (without load times): what must equal a clean load."""
    names = [
        name
        for (name,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'features\\_%' ORDER BY 1"
        ).fetchall()
    ]
    tables = {name: conn.execute(f"SELECT * FROM {name} ORDER BY symbol, date").fetchall() for name in names}
    ledger = conn.execute(
        "SELECT feature, symbol, input_hash, rows, inputs FROM refresher_features ORDER BY 1, 2"
    ).fetchall()
    return {"tables": tables, "ledger": ledger}


def forget_features(conn: psycopg.Connection[Any]) -> None:
    for (name,) in conn.execute(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE 'features\\_%'"
    ).fetchall():
        conn.execute(f"DROP TABLE {name}")
    conn.execute("DROP TABLE IF EXISTS refresher_features")


def assert_a_clean_load(
    conn: psycopg.Connection[Any], profile: Profile, store: FeatureStore, plan: GapPlan | None = None
) -> None:
    """The features as loaded equal a clean load of ``profile``: every feature table dropped and loaded again."""
    loaded = state(conn)
    forget_features(conn)
    refresh_features(conn, profile, store, plan or stored_plan(profile, store))
    assert loaded == state(conn)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_one_more_session_appends_and_equals_a_clean_load(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore, feature: str
) -> None:
    # Two months: fewer sessions than the longest windows (50, 63), so warm-up rows are appended too.
    before = profile_at(tmp_path, BEFORE, feature, months=2)
    refresh_features(conn, before, store, stored_plan(before, store))
    after = profile_at(tmp_path, AFTER, feature, months=2)
    counts = refresh_features(conn, after, store, stored_plan(after, store))
    assert counts.loaded == 3
    # Universe features move with every symbol: they reload whole. The others append the new session only.
    appends = not FEATURES[feature].needs_universe
    assert counts.appended == (3 if appends else 0)
    if appends:
        # Daily: the new session's row; intraday: the changed month's rows (June's 14 sessions), May stays.
        assert counts.rows_loaded == (3 if FEATURES[feature].timeframe == "1d" else 3 * 14)
    assert_a_clean_load(conn, after, store)


def test_a_back_fill_reloads_the_symbol(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    before = profile_at(tmp_path, BEFORE, "full_analysis, websocket_testing")
    refresh_features(conn, before, store, stored_plan(before, store))
    # The ledger says the rows came from other bars (as after a back-fill inside the month): no append.
    conn.execute(
        "UPDATE refresher_features SET inputs = replace(inputs, 'xxh3:', 'xxh3:0') WHERE symbol = 'BBB'"
    )
    after = profile_at(tmp_path, AFTER, "full_analysis, websocket_testing")
    counts = refresh_features(conn, after, store, stored_plan(after, store))
    assert (counts.loaded, counts.appended) == (6, 4)
    assert_a_clean_load(conn, after, store)


CHILD = textwrap.dedent(
    """
    import datetime as dt, os, signal, sys
    from pathlib import Path
    import psycopg
    import refresher.features.load as load
    import refresher.features.tables as tables
    from featurestore import FeatureStore
    from tests.refresher.test_features_append import AFTER, profile_at, stored_plan

    where, calls = sys.argv[4], []
    def die(*args):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "after-copy":  # inside the first feature's transaction: COPY done, ledger not yet
        tables._count_rows = die
    else:  # before the first feature's load (computed, nothing loaded) or before the second's
        replace = load.replace_feature_rows
        def counted(*args):
            calls.append(1)
            if len(calls) == (1 if where == "computed" else 2):
                die()
            return replace(*args)
        load.replace_feature_rows = counted
    profile = profile_at(Path(sys.argv[2]), AFTER, sys.argv[5])
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        load.refresh_features(conn, profile, FeatureStore(sys.argv[3]), stored_plan(profile, FeatureStore(sys.argv[3])))
    """
)


def run_killed(
    child: str, server: ServerInfo, root: Path, store: FeatureStore, where: str, features: str
) -> None:
    """Run ``child`` (a refresh of ``features`` as of AFTER that kills itself ``where`` it says): it died by -9."""
    done = subprocess.run(
        [sys.executable, "-c", child, server.dsn(), str(root), str(store.root), where, features],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr.decode()


@pytest.mark.parametrize("where", ["computed", "between-features", "after-copy"])
def test_kill_9_while_loading_then_rerun_equals_a_clean_load(
    tmp_path: Path, pg_database: ServerInfo, conn: psycopg.Connection[Any], store: FeatureStore, where: str
) -> None:
    features = "dashboard_data, websocket_testing, performance_metrics"
    before = profile_at(tmp_path, BEFORE, features)
    refresh_features(conn, before, store, stored_plan(before, store))
    loaded_before = state(conn)
    run_killed(CHILD, pg_database, tmp_path, store, where, features)
    killed = state(conn)
    if where == "between-features":
        # The first feature is loaded (appended), the others are as they were: never half of one.
        first = "features_dashboard_data"
        assert killed["tables"][first] != loaded_before["tables"][first]
        assert {k: v for k, v in killed["tables"].items() if k != first} == {
            k: v for k, v in loaded_before["tables"].items() if k != first
        }
    else:
        assert killed == loaded_before
    after = profile_at(tmp_path, AFTER, features)
    counts = refresh_features(conn, after, store, stored_plan(after, store))  # the re-run
    assert counts.appended == (6 if where == "between-features" else 9)
    assert_a_clean_load(conn, after, store)


def test_two_refreshes_at_once_end_as_a_clean_load(
    tmp_path: Path, pg_database: ServerInfo, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    features = "full_analysis, websocket_testing, dashboard_data"
    before = profile_at(tmp_path, BEFORE, features)
    refresh_features(conn, before, store, stored_plan(before, store))
    after = profile_at(tmp_path, AFTER, features)
    plan = stored_plan(after, store)

    def one() -> None:
        with psycopg.connect(pg_database.dsn(), autocommit=True) as own:
            refresh_features(own, after, FeatureStore(store.root), plan)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(one), pool.submit(one)]:
            future.result()
    assert_a_clean_load(conn, after, store, plan)


def test_rows_computed_against_a_ledger_that_moved_are_refused_then_loaded_whole(
    tmp_path: Path,
    pg_database: ServerInfo,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = profile_at(tmp_path, BEFORE, "dashboard_data")
    refresh_features(conn, before, store, stored_plan(before, store))
    after = profile_at(tmp_path, AFTER, "dashboard_data")
    plan = stored_plan(after, store)
    # These extend the rows as of BEFORE; meanwhile another refresh loads LATER.
    [batch] = compute_features(after, store, plan, None, read_ledger(conn), read_feature_ledger(conn).inputs)
    assert all(part.since == AFTER for part in batch.parts)
    later = profile_at(tmp_path, LATER, "dashboard_data")
    later_plan = stored_plan(later, store)
    refresh_features(conn, later, store, later_plan)
    moved = state(conn)
    with pytest.raises(StaleFeature, match="other rows were loaded"):
        replace_feature_rows(conn, "dashboard_data", batch.parts)
    assert state(conn) == moved  # nothing of the refused batch

    # refresh_features recovers by itself: the other refresh lands between its computing and its loading,
    # and it loads the feature whole against the ledger as it is then.
    refresh_features(conn, before, store, stored_plan(before, store))
    real = features_load.replace_feature_rows
    calls: list[str] = []

    def raced(own: psycopg.Connection[Any], name: str, parts: Any, fence: Any = None) -> int:
        calls.append(name)
        if len(calls) == 1:
            monkeypatch.setattr(features_load, "replace_feature_rows", real)  # the other refresh's own
            with psycopg.connect(pg_database.dsn(), autocommit=True) as other:
                refresh_features(other, later, store, later_plan)
            monkeypatch.setattr(features_load, "replace_feature_rows", raced)
        return real(own, name, parts, fence)

    monkeypatch.setattr(features_load, "replace_feature_rows", raced)
    counts = refresh_features(conn, after, store, plan)
    assert len(calls) == 2 and (counts.loaded, counts.appended) == (3, 0)
    assert_a_clean_load(conn, after, store, plan)


@pytest.mark.parametrize("as_of", [BEFORE, AFTER])
def test_a_feature_table_dropped_by_hand_is_loaded_whole_again(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore, as_of: dt.date
) -> None:
    features = "dashboard_data, websocket_testing"
    before = profile_at(tmp_path, BEFORE, features)
    refresh_features(conn, before, store, stored_plan(before, store))
    conn.execute("DROP TABLE features_dashboard_data")
    # The ledger still says every symbol's rows are loaded: the same bars again, or one more session to append.
    profile = profile_at(tmp_path, as_of, features)
    counts = refresh_features(conn, profile, store, stored_plan(profile, store))
    assert (counts.loaded, counts.appended) == ((3, 0) if as_of == BEFORE else (6, 3))
    assert_a_clean_load(conn, profile, store)


def test_verify_reloads_the_rows_of_a_feature_deleted_by_hand(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    features = "dashboard_data, websocket_testing"
    before = profile_at(tmp_path, BEFORE, features)
    plan = stored_plan(before, store)
    refresh_features(conn, before, store, plan)
    clean = state(conn)
    conn.execute("DELETE FROM features_dashboard_data WHERE symbol = 'BBB' AND date > '2024-06-10'")
    conn.execute("TRUNCATE features_websocket_testing")
    # Without --verify the ledger is trusted (one query per refresh); with it, every symbol's rows are counted.
    assert refresh_features(conn, before, store, plan).loaded == 0
    counts = refresh_features(conn, before, store, plan, verify=True)
    assert (counts.loaded, counts.computed) == (4, 0)
    assert state(conn) == clean


FIRST_LOAD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import psycopg
    import refresher.features.tables as tables
    from featurestore import FeatureStore
    from refresher.features.load import refresh_features
    from tests.refresher.test_features_append import AFTER, profile_at, stored_plan

    def then_die(step):
        def run(*args, **kwargs):
            step(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return run
    # After each step of a first load: the ledger made; the table made; the rows copied (the ledger rows not yet).
    step = {"ledger": "_ensure_ledger", "table": "_ensure_feature_table", "copy": "copy_arrow"}[sys.argv[4]]
    setattr(tables, step, then_die(getattr(tables, step)))
    profile = profile_at(Path(sys.argv[2]), AFTER, sys.argv[5])
    store = FeatureStore(sys.argv[3])
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        refresh_features(conn, profile, store, stored_plan(profile, store))
    """
)


@pytest.mark.parametrize("step", ["ledger", "table", "copy"])
def test_kill_9_after_each_step_of_a_first_load_then_rerun_equals_a_clean_load(
    tmp_path: Path, pg_database: ServerInfo, conn: psycopg.Connection[Any], store: FeatureStore, step: str
) -> None:
    features = "dashboard_data, websocket_testing"
    profile = profile_at(tmp_path, AFTER, features)
    stored_plan(profile, store)  # the bars in the store, as the refresh's segments step leaves them
    run_killed(FIRST_LOAD, pg_database, tmp_path, store, step, features)
    assert state(conn) == {"tables": {}, "ledger": []}  # nothing of any feature: an empty ledger
    counts = refresh_features(conn, profile, store, stored_plan(profile, store))  # the re-run
    assert (counts.loaded, counts.appended) == (6, 0)
    assert_a_clean_load(conn, profile, store)
