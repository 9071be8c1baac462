"""A worker asks the Docker daemon about a run's own server once, not for every connection to it, and still
connects to the server made again under it (``refresher down`` then up). The real Docker engine, a real
redis-server."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from refresher.engines import docker as docker_module
from refresher.engines import make_engine
from refresher.engines.docker import DockerEngine
from refresher.jobs import worker as worker_module
from refresher.jobs.queue import JobQueue, connect
from refresher.jobs.runs import RunSpec, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.segments import Segment
from refresher.settings import Settings
from tests.fixtures_postgres import world_traversable_tmp
from tests.redis_server import RedisServer
from tests.refresher.test_refresh_e2e import AS_OF, Workspace

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def docker_workspace(request: pytest.FixtureRequest) -> Iterator[Workspace]:
    request.getfixturevalue("docker_pg_image")  # skips (or fails in CI) without a Docker engine
    ws = Workspace(world_traversable_tmp("refresher-own-"), "docker", f"own_{secrets.token_hex(4)}")
    ws.write_profile()
    try:
        yield ws
    finally:
        ws.down()


def test_a_worker_asks_the_daemon_once_for_many_connections_and_again_when_the_server_was_made_again(
    docker_workspace: Workspace, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = docker_workspace
    settings = Settings.from_env(ws.env, engine="docker")
    engine = make_engine("docker", settings)
    first = engine.start(ws.profile)
    client = connect(redis_server.url)
    path = str(ws.root / "profiles" / f"{ws.profile}.yaml")
    spec = RunSpec(ws.profile, path, AS_OF.isoformat(), first.dsn(with_password=False), False)
    job = SegmentJob(Segment("AAPL", "1d", AS_OF.replace(day=1)), "key", "America/New_York")
    run = submit_jobs(client, spec, [job], now=dt.datetime.now(dt.UTC)).run_id

    daemon: list[
        Any
    ] = []  # each opens a client of the daemon: one look at the container (is it up, its port)
    real = docker_module._connect
    monkeypatch.setattr(docker_module, "_connect", lambda *args: daemon.append(args) or real(*args))
    worker = Worker(redis_server.url, settings, WorkerOptions("own"), client=client)
    queue, contexts = JobQueue(client), {}

    def connected() -> Any:
        """The worker's connection to the run's target, made as for a run (and closed, as a failed job's is)."""
        ctx = worker._context(queue, contexts, run)
        try:
            return ctx.conn.execute("SELECT current_database()").fetchone()[0], ctx.conn.info.port
        finally:
            contexts.pop(run).close()

    # Each of these was one daemon call: each run, each thread, each reconnect after a failed job.
    for _ in range(5):
        assert connected() == (ws.profile, first.port)
    assert len(daemon) == 1, daemon

    # `refresher down`, then up: another container on the same host port (a run's target names its port: on
    # another one it is no longer the profile's own server), its password new.
    engine.stop(ws.profile)
    again = DockerEngine(settings.state_dir, image=settings.pg_image_override, port=first.port)
    second = again.start(ws.profile)
    assert (second.port, second.password != first.password) == (first.port, True)
    daemon.clear()
    for _ in range(3):
        assert connected() == (ws.profile, second.port)
    # The kept answer failed once (its password no longer logs in), the daemon was asked again, once.
    assert len(daemon) == 1, daemon
    assert worker._servers.get({"profile": ws.profile, "target": spec.target}) == second

    # The snapshot at the run's end ends the server's sessions: it asks the daemon, whatever was kept.
    daemon.clear()
    monkeypatch.setattr(worker_module.snapshot, "is_current", lambda server: server == second)
    worker._context(queue, contexts, run)
    assert worker._snapshot(contexts, run) == "unchanged" and len(daemon) == 1
