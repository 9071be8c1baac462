"""A run's "target down since" record (``refresher.jobs.target_down``), against a real redis-server."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from refresher.jobs.namespace import DEFAULT
from refresher.jobs.queue import connect
from refresher.jobs.runs import RunSpec, submit_jobs
from refresher.jobs.target_down import CONNECT, SESSION, found_down
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def _run(redis_server: RedisServer, tmp_path: Path) -> str:
    spec = RunSpec("p", str(tmp_path / "p.yaml"), "2024-06-28", "host=127.0.0.1 dbname=p", False)
    return submit_jobs(connect(redis_server.url), spec, [], now=dt.datetime.now(dt.UTC)).run_id


def test_a_connect_finding_no_worker_added_to_is_forgotten_and_a_session_one_is_not(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A finding that nothing ended (the workers that met it stopped, or it was a blip no one connected after)
    judged the run's next outage, hours later, by its start: the wait over at once, every attempt spent. Past
    ``forgotten_after`` with no finding added, the next starts a new one (its count 1 again). The features
    session's half is kept until the step ends: a step that crashes its server each time spends its attempts."""
    client, run = connect(redis_server.url), _run(redis_server, tmp_path)
    for _ in range(2):
        found_down(client, DEFAULT, run, CONNECT, forgotten_after=0.2)
        found_down(client, DEFAULT, run, SESSION, forgotten_after=0.2)
    time.sleep(0.5)  # no finding added for longer than forgotten_after
    assert found_down(client, DEFAULT, run, CONNECT, forgotten_after=0.2)[0] == 1
    assert found_down(client, DEFAULT, run, SESSION, forgotten_after=0.2)[0] == 3
    # Found again within forgotten_after: the same outage, counted on.
    assert found_down(client, DEFAULT, run, CONNECT, forgotten_after=3600.0)[0] == 2
