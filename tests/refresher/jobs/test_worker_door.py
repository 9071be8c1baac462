"""A worker at a database door a reset left shut: real worker processes, a real redis-server, a real embedded
Postgres."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from refresher import snapshot
from refresher._snapshot_sql import TAKE
from refresher.engines.base import ServerInfo
from refresher.jobs.queue import DEAD, RETRY, connect, text
from refresher.jobs.runs import RunSpec, run_status, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.pool import wait_for_pool
from refresher.segments import Segment
from refresher.settings import Settings
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import status, submit, wait_at_door, worker_log, workspace
from tests.refresher.test_refresh_e2e import AS_OF, Workspace
from tests.refresher.test_snapshot_adversarial import _refusing
from tests.refresher.test_snapshot_crash import _killed_after

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
            wait_at_door(reset, "door-worker", worker, lambda: worker_log(ws, "door"))
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


def test_a_run_targeting_this_machines_server_by_its_dsn_opens_a_killed_resets_door(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """A run submitted with ``--target`` naming the profile's own server (``refresher url``'s DSN, as a script
    passes it) is that server all the same: a reset killed with its door shut left the database refusing
    sessions, and the worker (as submit) retried until its jobs went dead, where a run without ``--target``
    opened the door. Both open it; the worker logs in as the DSN's role, with the state dir's password."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    ws.refresh()
    server = ws.server()
    wait_for_pool(server, timeout=300)  # the refresh's refill is done: the reset has the server alone
    ws.write_profile(symbols=["AAPL"], months=2)  # February too: jobs for the worker
    run = submit(ws, url, "--target", ws.dsn())
    assert run["jobs"] == 2
    assert not _killed_after(server, 1, "snapshot.restore_pristine(server, refill=False)")  # ALTER DATABASE
    assert _refusing(server)
    done = ws.run("worker", "--queue", url, "--name", "door", "--burst", "--max-attempts", "2")
    state = status(ws, url, run["run_id"])
    assert (state["state"], state["done"], state["dead"]) == ("complete", 2, 0), done.stderr
    assert not _refusing(server)
    assert not _killed_after(server, 1, "snapshot.restore_pristine(server, refill=False)")
    assert _refusing(server)
    assert submit(ws, url, "--target", ws.dsn())["jobs"] == 0
    assert not _refusing(server)


def test_a_foreign_targets_shut_door_fails_the_attempt_at_once_retried_after_a_backoff(
    pg_database: ServerInfo, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target this machine does not serve for the profile, its door left shut by a reset killed on the machine
    that serves it: not ours to open. The worker waited DOOR_WAIT_SECONDS (30 s) for it at each attempt, the
    worker held all that time; each attempt now fails at once as a transient failure, the queue trying it again
    after a backoff, and the last one's line says what to do."""
    ws = Workspace(tmp_path, "local", "foreign")
    ws.write_profile(symbols=["AAPL"], months=1)
    with psycopg.connect(pg_database.dsn("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                sql.Identifier(pg_database.dbname)
            )
        )
    target = pg_database.dsn(with_password=False)
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    spec = RunSpec("foreign", str(tmp_path / "profiles" / "foreign.yaml"), AS_OF.isoformat(), target, False)
    job = SegmentJob(Segment("AAPL", "1d", AS_OF.replace(day=1)), "key-1d", "America/New_York")
    client = connect(redis_server.url)
    run = submit_jobs(client, spec, [job], now=dt.datetime.now(dt.UTC)).run_id
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions("foreign", burst=True, max_attempts=2, backoff_base=0.1, backoff_cap=0.5)
    started = time.monotonic()
    report = Worker(redis_server.url, settings, options).run()
    took = time.monotonic() - started
    assert (report.retried, report.dead, report.done) == (
        1,
        1,
        0,
    )  # one backoff, then the second attempt died
    # Before: 60 s, two attempts of DOOR_WAIT_SECONDS (30 s) at the door. One attempt that waited there takes that
    # long alone, so the bound is the bug's floor, not a guess at this machine's speed.
    assert took < snapshot.DOOR_WAIT_SECONDS, took
    assert run_status(client, run).dead == 1
    [(_id, letter)] = client.xrange(DEAD)
    error = text(letter[b"error"])
    assert "\n" not in error and error.startswith(f"transient: target {target}: cannot connect"), error
    assert f"database {pg_database.dbname} refuses sessions (its door is shut)" in error, error
    assert "run `refresher reset` of its profile there" in error, error
    assert _refusing(pg_database)  # not ours to open
