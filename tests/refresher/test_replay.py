"""The daily refresh brings the pristine copy up to date by writing its rows again into a warm clone instead of
copying the database: the copy then equals the database (every table, every ledger column), after a kill -9
mid-way and with two at once; anything it cannot vouch for falls back to a copy."""

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
from psycopg import sql

from featurestore import FeatureStore
from refresher import snapshot
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.pool import pool_status, refill_pool, wait_for_pool
from refresher.profile import Profile, load_profile
from refresher.refresh import refresh
from tests.refresher.test_refresh_batches import root

__all__ = ["root"]  # a fixture, imported to be found
pytestmark = pytest.mark.postgres
THURSDAY, FRIDAY, MONDAY = dt.date(2025, 3, 27), dt.date(2025, 3, 28), dt.date(2025, 3, 31)
PROFILE = (
    "universe:\n  symbols: [AAPL, KO, MSFT]\nmonths: 2\ntimeframes: [1d, 1m]\n"
    "features: [full_analysis, performance_metrics, websocket_testing]\nseed: 5\n"
)


def _profile(root: Path, as_of: dt.date) -> Profile:
    (root / "daily.yaml").write_text(PROFILE)
    return load_profile(str(root / "daily.yaml"), [], as_of=as_of)


def _loaded(root: Path) -> tuple[LocalEngine, FeatureStore, ServerInfo]:
    """Thursday's refresh done and its pool refilled, as a day later. A pool of 2 asked for (and remembered): the
    default keeps none for a database this small on ext4, and a replay needs a ready clone."""
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    refresh(_profile(root, THURSDAY), engine, store, pool_size=2)
    server = engine.start("daily")
    wait_for_pool(server, timeout=120)
    return engine, store, server


def _contents(dsn: str) -> dict[str, str]:
    """Every table of the database, each row as text (load times and ledger inputs included)."""
    with psycopg.connect(dsn) as conn:
        names = [
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        ]
        return {
            name: str(
                conn.execute(
                    sql.SQL(
                        "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {} t"
                    ).format(sql.Identifier(name))
                ).fetchone()
            )
            for name in names
        }


def _pristine_contents(server: ServerInfo) -> dict[str, str]:
    """What a reset brings back, read from the reset database (a clone of the pristine copy)."""
    assert snapshot.restore_pristine(server, refill=False).method in ("pool", "template")
    return _contents(server.dsn())


def _no_copy(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the daily refresh copied the database for its snapshot")


def _half_built(server: ServerInfo) -> list[str]:
    with psycopg.connect(server.dsn("postgres")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (f"{server.dbname}__building_",)
        ).fetchall()
    return [r[0] for r in rows]


def test_a_daily_refresh_advances_the_copy_without_copying_and_it_equals_the_database(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store, server = _loaded(root)
    monkeypatch.setattr(snapshot, "save_pristine", _no_copy)
    report = refresh(_profile(root, FRIDAY), engine, store)
    assert report.snapshot == "saved" and report.features.appended == 9
    # The advanced copy is current: the same refresh again has nothing to snapshot.
    assert snapshot.is_current(server)
    assert refresh(_profile(root, FRIDAY), engine, store).snapshot == "unchanged"
    live = _contents(server.dsn())
    assert _pristine_contents(server) == live
    # A reset database is a faithful copy: its ledger stamp is the copy's, so the next reset is allowed too.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'KO'")
    assert _pristine_contents(server) == live
    # And again the next session, from the clones the refill made of the advanced copy.
    refill_pool(server)  # the resets took clones and asked no refill
    refresh(_profile(root, MONDAY), engine, store)
    assert _pristine_contents(server) == _contents(server.dsn())


def test_without_a_ready_clone_or_after_a_prune_the_snapshot_is_a_copy(root: Path) -> None:
    engine, store, server = _loaded(root)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
        for name in pool_status(server).ready:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    refresh(_profile(root, FRIDAY), engine, store)
    assert _pristine_contents(server) == _contents(server.dsn())
    refill_pool(server)  # the resets took clones and asked no refill
    refresh(_profile(root, MONDAY), engine, store, prune=True)
    assert _pristine_contents(server) == _contents(server.dsn())


def test_a_copy_that_would_differ_from_the_database_is_not_published(root: Path) -> None:
    _engine, _store, server = _loaded(root)
    base = snapshot.pristine_ledger(server)
    assert base is not None
    # The database moved on (another refresh, a hand edit of the ledger) while nothing was written to the clone.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE refresher_segments SET rows = rows + 1 WHERE symbol = 'KO'")
    assert snapshot.advance_pristine(server, base, lambda conn: None) is None
    assert snapshot.pristine_ledger(server) == base and _half_built(server) == []
    # A base the copy does not hold is refused before any clone is taken.
    ready = pool_status(server).ready
    assert snapshot.advance_pristine(server, "0" * 64, lambda conn: None) is None
    assert pool_status(server).ready == ready


def test_two_advances_at_once_publish_one_copy(root: Path) -> None:
    _engine, _store, server = _loaded(root)
    base = snapshot.pristine_ledger(server)
    assert base is not None

    def touch(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE refresher_segments SET rows = rows + 1 WHERE symbol = 'KO'")

    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        touch(conn)
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: snapshot.advance_pristine(server, base, touch), range(2)))
    # The second finds the copy moved on (its base is gone) and leaves it: never a clone touched twice.
    assert sum(info is not None for info in done) == 1
    assert _half_built(server) == []
    assert _pristine_contents(server) == _contents(server.dsn())


CHILD = textwrap.dedent(
    """
    import datetime as dt, os, signal, sys
    from pathlib import Path
    from featurestore import FeatureStore
    from refresher import replay
    from refresher.engines.local import LocalEngine
    from refresher.refresh import refresh
    from tests.refresher.test_replay import FRIDAY, _profile

    def die(*args):
        os.kill(os.getpid(), signal.SIGKILL)
    replay.replace_feature_rows = die  # the clone has this run's segments, not yet its features
    root = Path(sys.argv[1])
    refresh(_profile(root, FRIDAY), LocalEngine(root / "state"), FeatureStore(root / "store"))
    """
)


def test_kill_9_while_writing_into_the_clone_then_rerun_equals_the_database(root: Path) -> None:
    engine, store, server = _loaded(root)
    before = snapshot.pristine_ledger(server)
    done = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()
    # The old copy stands (a reset now is refused: the database moved on), the half-written clone is a leftover.
    assert snapshot.pristine_ledger(server) == before
    assert _half_built(server) != []
    report = refresh(_profile(root, FRIDAY), engine, store)  # loads nothing, snapshots by a copy
    assert report.rows_loaded == 0 and report.snapshot == "saved"
    assert _pristine_contents(server) == _contents(server.dsn())
    refill_pool(server)  # its sweep drops the half-built clone
    assert _half_built(server) == []
