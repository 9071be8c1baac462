"""How a queue run ends, through real Redis, real worker processes and a real embedded Postgres: as a refresh
ends (features from whatever store the finishing worker has, ``--prune``, and the snapshot ``reset`` uses)."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from featurestore import FeatureStore
from refresher.jobs.queue import FEATURES_DUE, run_key
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import SYMBOLS, run_burst, status, submit, workspace
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared with test_worker


def count(ws: Workspace, query: str) -> int:
    return int(ws.scalar(query))


def test_a_queue_run_ends_as_a_refresh_does(workspace: Workspace, redis_server: RedisServer) -> None:
    ws, url, client = workspace, redis_server.url, redis_server.client()
    run = submit(ws, url)["run_id"]
    run_burst(ws, url, "a")
    assert status(ws, url, run)["state"] == "complete"

    # The snapshot is saved: `refresher reset` brings back what the run loaded.
    assert client.hget(run_key(run), "snapshot") == b"saved"
    loaded = ws.checksums()
    with psycopg.connect(ws.dsn()) as conn:
        conn.execute("DELETE FROM ohlcv_daily WHERE symbol = 'KO'")
    ws.run("reset", "--profile", ws.profile)
    assert ws.checksums() == loaded

    # Features computed by a worker whose store holds none of the run's segments (another machine's).
    client.sadd(FEATURES_DUE, run)
    other_store = ws.root / "store-elsewhere"
    done = subprocess.run(
        ws.command("worker", "--queue", url, "--name", "b", "--burst"),
        env={**ws.env, "FEATURE_STORE_PATH": str(other_store)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert not client.sismember(FEATURES_DUE, run)
    assert FeatureStore(other_store).get_cache_stats().entries > 0
    assert count(ws, "SELECT count(*) FROM refresher_features") == len(SYMBOLS)

    # --prune: a symbol that left the profile loses its bars and its feature rows when the run ends.
    ws.write_profile(symbols=SYMBOLS[:-1], months=3)
    pruned = submit(ws, url, "--prune")
    assert pruned["jobs"] == 0
    run_burst(ws, url, "c")
    assert status(ws, url, pruned["run_id"])["state"] == "complete"
    gone = SYMBOLS[-1]
    for table in ("ohlcv_daily", "ohlcv_1min", "features_dashboard_data", "refresher_features"):
        assert count(ws, f"SELECT count(*) FROM {table} WHERE symbol = '{gone}'") == 0, table
    assert count(ws, "SELECT count(DISTINCT symbol) FROM features_dashboard_data") == len(SYMBOLS) - 1
