"""Redis at its ``maxmemory`` (policy noeviction, the default) refuses every write that would grow its memory
(``OOM command not allowed``): workers go on loading and acknowledging, which frees memory, and the commands say so
in one line. Real redis-server, real worker processes, real embedded Postgres."""

from __future__ import annotations

import json
import time

import pytest

from refresher.jobs.queue import run_key
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

__all__ = ["workspace"]  # the fixture, shared with test_worker

OOM = "out of memory"


def fill_up(redis_server: RedisServer) -> None:
    """Redis at its maxmemory from now on: every command that grows memory is refused, until ``make_room``."""
    client = redis_server.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1)


def make_room(redis_server: RedisServer) -> None:
    redis_server.client().config_set("maxmemory", 0)  # an operator raising the limit


def test_a_worker_meeting_redis_at_its_maxmemory_loads_every_job_and_the_run_completes_after(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    # The in-flight mark (the first script a worker runs on a job) was refused: the worker's thread died with a
    # traceback and the process exited 0, its jobs pending until another worker reclaimed them and died the same way.
    ws, url, client = workspace, redis_server.url, redis_server.client()
    run = submit(ws, url)
    fill_up(redis_server)
    worker = start_worker(ws, url, "w")
    try:
        deadline = time.monotonic() + 300
        while int(client.hget(run_key(run["run_id"]), "done") or 0) < run["jobs"]:
            assert worker.poll() is None, worker_log(ws, "w")
            assert time.monotonic() < deadline, worker_log(ws, "w")
            time.sleep(0.2)
        # Every job loaded and acknowledged at the limit; the features lock is a new key: refused until there is room.
        time.sleep(1)
        assert worker.poll() is None, worker_log(ws, "w")
        assert status(ws, url, run["run_id"])["state"] == "loaded"
        make_room(redis_server)
        final = wait_for(ws, url, run["run_id"], lambda s: worker.poll() is None and s["state"] == "complete")
    finally:
        stop([worker])
    log = worker_log(ws, "w")
    assert worker.returncode == 0 and "Traceback" not in log, log
    assert OOM in log and log.count(OOM) <= 3, log  # said, not once per sweep
    assert (final["done"], final["dead"], final["lost"]) == (run["jobs"], 0, 0)
    assert_loaded_exactly(ws, SYMBOLS, 3)
    # The way to make room works at the limit: prune wrote the run's fence record first (HSET), and was refused.
    fill_up(redis_server)
    pruned = json.loads(ws.run("jobs", "prune", "--older-than", "0s", "--queue", url, "--json").stdout)
    assert pruned["deleted"] == [run["run_id"]] and pruned["fences"] == 1, pruned


def test_commands_meeting_redis_at_its_maxmemory_are_one_line_and_exit_2(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    # A submit was a traceback (OutOfMemoryError), exit 1.
    ws, url = workspace, redis_server.url
    run = submit(ws, url)
    fill_up(redis_server)
    refused = ws.run("jobs", "submit", "--profile", ws.profile, "--queue", url, expect=2).stderr
    assert OOM in refused and "maxmemory" in refused and "Traceback" not in refused, refused
    assert len(refused.strip().splitlines()) == 1, refused
    ws.run("jobs", "cancel", run["run_id"], "--queue", url, expect=2)
    # Read at the limit: status was a MULTI, whose every queued command Redis refuses then.
    assert status(ws, url, run["run_id"])["pending"] == run["jobs"]
    listed = ws.run("jobs", "list", "--queue", url, "--json").stdout
    # the refused submit made no run
    assert [r["run_id"] for r in json.loads(listed)["runs"]] == [run["run_id"]]
    deleted = json.loads(ws.run("jobs", "delete", run["run_id"], "--force", "--queue", url, "--json").stdout)
    assert deleted["deleted"] == [run["run_id"]], deleted
