"""Two checkouts, each with its own target, pointing ``--queue`` at one Redis database in two namespaces: each
worker loads its own checkout's jobs only, every segment once (real redis-server, real workers, two real
Postgres servers). Without namespaces, checkout B's worker took A's jobs and dead-lettered them: it has no
password for A's target."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.fixtures_postgres import world_traversable_tmp
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import ledger, start_worker, status, stop, submit, worker_log
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

SYMBOLS = {"a": ["AAPL", "KO"], "b": ["MSFT", "PEP"]}


@pytest.fixture
def checkouts() -> Iterator[list[Workspace]]:
    made: list[Workspace] = []
    try:
        for team, symbols in SYMBOLS.items():
            ws = Workspace(
                world_traversable_tmp(f"refresher-ns-{team}-"), "local", f"ns{team}_{uuid.uuid4().hex[:8]}"
            )
            ws.write_profile(symbols=symbols, months=2)
            made.append(ws)
        yield made
    finally:
        for ws in made:
            ws.down()


def test_two_checkouts_on_one_redis_database_each_load_only_their_own_jobs(
    checkouts: list[Workspace], redis_server: RedisServer
) -> None:
    urls = [f"{redis_server.url}?namespace=checkout-{team}" for team in SYMBOLS]
    runs = [submit(ws, url) for ws, url in zip(checkouts, urls, strict=True)]
    # B's worker first: with one namespace for both, it took A's jobs before A's worker started.
    workers = [
        start_worker(ws, url, f"w{i}", "--burst")
        for i, (ws, url) in reversed(list(enumerate(zip(checkouts, urls, strict=True))))
    ]
    try:
        for proc in workers:
            proc.wait(timeout=600)
    finally:
        stop(workers)
    for i, (ws, url, run) in enumerate(zip(checkouts, urls, runs, strict=True)):
        log = worker_log(ws, f"w{i}")
        final = status(ws, url, run["run_id"])
        assert final["state"] == "complete", (final, log)
        assert final["done"] == final["total"] == run["jobs"] > 0 and final["dead"] == 0, log
        assert final["namespace"] == f"checkout-{'ab'[i]}"
        loaded = ledger(ws)
        assert len(loaded) == run["jobs"], loaded  # every segment once, only its own checkout's symbols
        assert {seg.split("/")[0] for seg in loaded} == set(SYMBOLS["ab"[i]])
        with psycopg.connect(ws.dsn()) as conn:
            row = conn.execute("SELECT sum(rows) FROM refresher_segments").fetchone()
        assert row is not None and final["rows_loaded"] == row[0] > 0
        assert "dead-lettered" not in log, log
    assert [w.returncode for w in workers] == [0, 0]
