"""``jobs prune`` and ``jobs delete --force`` while a real worker runs jobs, through real Redis and a real embedded
Postgres: the worker lives on, nothing of the removed runs is left in Redis, a later run loads what is missing."""

from __future__ import annotations

import json
import signal
import time

import pytest

from refresher.jobs.queue import DEAD, RETRY, TIERS, stream_key, text
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import (
    SYMBOLS,
    start_worker,
    status,
    stop,
    submit,
    wait_for,
    worker_log,
    workspace,
)
from tests.refresher.jobs.test_worker_faults import assert_loaded_exactly
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]


def test_prune_and_a_forced_delete_while_a_worker_runs_leave_no_key_and_lose_no_row(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url, client = workspace, redis_server.url, redis_server.client()
    worker = start_worker(ws, url, "w")

    def alive() -> None:
        assert worker.poll() is None, worker_log(ws, "w")

    try:
        first = submit(ws, url)["run_id"]
        wait_for(ws, url, first, lambda s: alive() or s["state"] == "complete")
        symbols = [*SYMBOLS, "IBM", "XOM", "CVX", "JPM", "BAC", "WMT", "HD", "DIS"]
        ws.write_profile(symbols=symbols, months=3)
        second = submit(ws, url)["run_id"]
        wait_for(ws, url, second, lambda s: alive() or s["done"] >= 1)
        # Frozen mid-batch, its claimed jobs in hand (a long COPY, a GC pause), so the run is surely running.
        worker.send_signal(signal.SIGSTOP)
        try:
            state = status(ws, url, second)["state"]
            assert state in ("queued", "loaded")  # jobs out, or its features due
            pruned = json.loads(
                ws.run("jobs", "prune", "--older-than", "0s", "--queue", url, "--json").stdout
            )
            assert pruned["deleted"] == [first] and pruned["running"] == {second: state}, pruned
            refused = ws.run("jobs", "delete", second, "--queue", url, expect=2)
            assert "--force" in refused.stderr and refused.stderr.count("\n") == 1
            ws.run("jobs", "delete", second, "--force", "--queue", url)
        finally:
            worker.send_signal(signal.SIGCONT)
        time.sleep(3)  # the worker settles what it held: acknowledged only
        alive()
        third = submit(ws, url)  # plans again: what the deleted run had not loaded
        final = wait_for(ws, url, third["run_id"], lambda s: alive() or s["state"] == "complete")
    finally:
        stop([worker])
    assert worker.returncode == 0 and "Traceback" not in worker_log(ws, "w"), worker_log(ws, "w")
    assert final["done"] == final["total"] == third["jobs"]
    left = {text(k).split(":")[2] for k in client.scan_iter("refresher:run:*")}
    assert left == {third["run_id"]}, left
    for tier in TIERS:
        assert client.xlen(stream_key(tier)) == 0
    assert client.xlen(DEAD) == 0 and client.zcard(RETRY) == 0
    ws.run("jobs", "status", first, "--queue", url, expect=2)
    ws.run("jobs", "status", second, "--queue", url, expect=2)
    assert_loaded_exactly(ws, symbols, 3)
