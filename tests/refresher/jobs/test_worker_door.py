"""A worker at a database door a reset left shut: real worker processes, a real redis-server, a real embedded
Postgres."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from refresher._snapshot_sql import TAKE
from refresher.engines.base import ServerInfo
from refresher.jobs.queue import RETRY
from refresher.pool import wait_for_pool
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import status, submit, worker_log, workspace
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_snapshot_adversarial import _refusing

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared

# The worker, its door wait ten minutes: still waiting when the test gives up, unless the stop event ends it.
_LONG_DOOR = (
    "import sys; from refresher import cli, snapshot; snapshot.DOOR_WAIT_SECONDS = 600; sys.exit(cli.main())"
)


@contextmanager
def stopped_reset(server: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    """A reset stopped (SIGSTOP) between shutting ``server``'s database door and its swap: TAKE held by a live
    session (yielded), the database refusing new ones. Its door opens and TAKE goes at the end."""
    door = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as reset:
        reset.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (server.dbname, TAKE))
        reset.execute(door.format(sql.Identifier(server.dbname), sql.SQL("false")))
        try:
            yield reset
        finally:
            reset.execute(door.format(sql.Identifier(server.dbname), sql.SQL("true")))


def test_sigterm_at_a_stopped_resets_door_hands_the_jobs_back_at_once_and_exits_0(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """A worker waiting at the door a stopped reset holds shut (``connect_working``, DOOR_WAIT_SECONDS) left only
    after the whole wait, then waited again for each job alone: SIGTERM did not stop it. It stops within a slice
    of the wait, its jobs handed back without spending an attempt, exit 0, the door left to the reset."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    ws.refresh()
    server = ws.server()
    wait_for_pool(server, timeout=300)  # the refresh's refill is done: TAKE is the stopped reset's alone
    ws.write_profile(symbols=["AAPL"], months=2)  # February too: jobs for the worker
    run = submit(ws, url)
    assert run["jobs"] == 2
    args = ["worker", "--queue", url, "--name", "door", "--visibility-timeout", "600", "--engine", ws.engine]
    with stopped_reset(server) as reset, (ws.root / "worker-door.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-c", _LONG_DOOR, *args],
            env={**ws.env, "PGAPPNAME": "door-worker"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            waiting = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'door-worker' AND wait_event = 'advisory'"
            deadline = time.monotonic() + 300
            while reset.execute(waiting).fetchone() is None:
                assert worker.poll() is None and time.monotonic() < deadline, worker_log(ws, "door")
                time.sleep(0.05)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=120) == 0, worker_log(ws, "door")  # before: ten minutes at the door
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert _refusing(server)  # the live reset's door: never opened by the worker
    state = status(ws, url, run["run_id"])
    assert (state["in_flight"], state["retrying"], state["done"], state["dead"]) == (0, 2, 0, 0), state
    retries = [json.loads(member) for member in redis_server.client().zrange(RETRY, 0, -1)]
    assert [job.get("attempt", 0) for job in retries] == [0, 0]  # handed back, no attempt spent
    assert redis_server.client().xpending("refresher:jobs:normal", "workers")["pending"] == 0
