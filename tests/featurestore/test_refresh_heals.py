"""The store healing inside a real refresh (embedded Postgres): damaged manifests, damaged segment files, and the
hit/miss counters a refresh reports against the ones ``featurestore stats`` shows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from featurestore import Entry, FeatureStore
from refresher.engines.base import ServerInfo
from refresher.engines.existing import ExistingServerEngine
from refresher.profile import Profile, profile_from_file
from refresher.refresh import RefreshReport, refresh
from tests.featurestore.test_heal import DAMAGES

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROFILE = """\
description: the store heals inside a refresh
universe:
  symbols: [AAPL, MSFT]
exchange: XNYS
months: 2
as_of: 2025-03-31
timeframes: [1d, 1m]
features: [dashboard_data]
seed: 5
"""
DESIRED = 2 * 2 * 2  # symbols x timeframes x months
CHECKSUMS = """
SELECT symbol, md5(string_agg(concat_ws(',', ts, open, high, low, close, volume), ';' ORDER BY ts))
FROM ohlcv_1min GROUP BY 1 UNION ALL
SELECT symbol || '/1d', md5(string_agg(concat_ws(',', date, close, volume), ';' ORDER BY date))
FROM ohlcv_daily GROUP BY 1
"""


@pytest.fixture
def profile(tmp_path: Path) -> Profile:
    path = tmp_path / "store_heals.yaml"
    path.write_text(PROFILE)
    return profile_from_file(path)


@pytest.fixture
def store_root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store"


def run(profile: Profile, server: ServerInfo, root: Path) -> RefreshReport:
    """One refresh in a FeatureStore object of its own, as one `refresher refresh` process would."""
    return refresh(profile, ExistingServerEngine(server), FeatureStore(root))


def segment_entries(store: FeatureStore) -> list[Entry]:
    """The manifest's segment entries (``kind`` column), those in packs first."""
    with store.manifest.read() as con:
        entries = store.manifest.select(con)
        segments = {
            key for (key,) in con.execute("SELECT key FROM entries WHERE kind = 'segment'").fetchall()
        }
    return sorted(
        (e for e in entries.values() if e.key in segments), key=lambda e: (e.pack_offset is None, e.key)
    )


def checksums(server: ServerInfo) -> dict[str, str]:
    with psycopg.connect(server.dsn()) as conn:
        return {name: digest for name, digest in conn.execute(CHECKSUMS)}


def stats_cli(root: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "featurestore.cli", "stats", "--cache-root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("how", ["garbage", "truncated-header", "zeroed-block", "deleted"])
def test_refresh_over_a_damaged_or_deleted_manifest_succeeds_and_fetches_nothing(
    profile: Profile, pg_database: ServerInfo, store_root: Path, how: str
) -> None:
    first = run(profile, pg_database, store_root)
    assert first.segments.fetched == DESIRED
    manifest = store_root / "manifest.duckdb"
    if how == "deleted":
        manifest.unlink()
    else:
        manifest.write_bytes(DAMAGES[how](manifest.read_bytes()))

    second = run(profile, pg_database, store_root)
    # Every segment came back from its file: the plan saw them all, nothing was fetched from the source.
    assert second.segments.fetched == 0 and second.segments.present == DESIRED
    assert (second.store.hits, second.store.misses) == (DESIRED, 0)
    report = FeatureStore(store_root).validate_cache_integrity()
    assert report.ok and report.orphans == () and report.checked == first.store.misses


def test_damaged_segment_files_are_fetched_again_in_the_same_run(
    profile: Profile, pg_database: ServerInfo, store_root: Path
) -> None:
    run(profile, pg_database, store_root)
    before = checksums(pg_database)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM refresher_segments")  # the database forgets: every segment is to load
    files = list(dict.fromkeys(e.path for e in segment_entries(FeatureStore(store_root))))[:3]
    assert files[0].parent.name == "packs"  # the daily segments of a batch share one file
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    data = bytearray(files[1].read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped bit in a data page
    files[1].write_bytes(bytes(data))
    files[2].unlink()  # gone

    report = run(profile, pg_database, store_root)
    assert report.segments.loaded == DESIRED
    assert any("fetched them again" in note for note in report.notes), report.notes
    assert checksums(pg_database) == before
    after = FeatureStore(store_root).validate_cache_integrity()
    assert after.ok and after.checked >= DESIRED


def test_refresh_report_and_featurestore_stats_count_the_same(
    profile: Profile, pg_database: ServerInfo, store_root: Path
) -> None:
    cold = run(profile, pg_database, store_root)
    assert cold.store.misses >= DESIRED  # every segment, and the features computed
    stats = stats_cli(store_root)
    assert (stats["hits"], stats["misses"]) == (cold.store.hits, cold.store.misses)

    noop = run(profile, pg_database, store_root)
    assert (noop.store.hits, noop.store.misses) == (DESIRED, 0)
    stats = stats_cli(store_root)
    assert stats["hits"] == cold.store.hits + noop.store.hits
    assert stats["misses"] == cold.store.misses + noop.store.misses


def test_a_damaged_daily_file_the_features_need_is_fetched_again_in_the_same_run(
    profile: Profile, pg_database: ServerInfo, store_root: Path
) -> None:
    first = run(profile, pg_database, store_root)
    with psycopg.connect(pg_database.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM refresher_features")  # the features must be computed again, not the bars
    entries = segment_entries(FeatureStore(store_root))
    daily = next(e for e in entries if e.rows < 100)
    damaged = sum(e.path == daily.path for e in entries)  # every daily segment of its pack
    daily.path.write_bytes(daily.path.read_bytes()[:100])

    report = run(profile, pg_database, store_root)
    assert report.segments.loaded == 0 and report.features.loaded == first.features.loaded
    assert any(f"{damaged} segment files were missing or corrupt" in note for note in report.notes), (
        report.notes
    )
    assert FeatureStore(store_root).validate_cache_integrity().ok
