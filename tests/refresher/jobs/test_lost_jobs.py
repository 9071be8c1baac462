"""A stream trimmed or deleted by hand loses its jobs: ``jobs status`` says how many in one line and ``jobs status
--watch`` ends with exit status 2 rather than waiting for good. Real redis-server."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from refresher.jobs import runs
from refresher.jobs.queue import JobQueue, connect, stream_key
from refresher.jobs.runs import list_runs, run_status, submit_jobs
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_cli_queue import one_line, refresher
from tests.refresher.jobs.test_queue import jobs, spec

pytestmark = pytest.mark.redis


def test_jobs_lost_with_their_stream_are_reported_and_watch_ends_with_status_2(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("LOST", 5), now=now).run_id
    queue = JobQueue(client)
    [first, second] = queue.read("w", block_ms=0, count=2)
    queue.finish(first, rows=1, loaded=True, now=now.timestamp())  # one done, one in a worker's hands
    state = run_status(client, run)
    assert (state.lost, state.pending) == (0, 4)
    client.xtrim(
        stream_key("normal"), maxlen=2, approximate=False
    )  # an operator trims: two of the four left remain
    assert run_status(client, run).lost == 2
    client.delete(stream_key("normal"))  # and then deletes it
    state = run_status(client, run)
    assert (state.state, state.lost, state.pending) == ("queued", 4, 0)

    human = refresher(tmp_path, "jobs", "status", run, "--queue", redis_server.url)
    assert human.returncode == 0, human.stderr
    assert "4 job(s) lost" in human.stdout.splitlines()[0], human.stdout
    as_json = refresher(tmp_path, "jobs", "status", run, "--queue", redis_server.url, "--json")
    assert json.loads(as_json.stdout)["lost"] == 4
    # It waited for ever: nothing would ever run those jobs.
    watched = refresher(tmp_path, "jobs", "status", run, "--watch", "--queue", redis_server.url)
    one_line(watched, run, "4 job(s) lost", "jobs cancel")
    queue.finish(second, rows=1, loaded=True, now=now.timestamp())  # the worker's job still counts
    assert run_status(client, run).lost == 3


def test_a_run_being_submitted_or_held_is_not_lost(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    held = submit_jobs(client, spec("normal"), jobs("HELD", 3), now=now, held_until_ts=now.timestamp() + 3600)
    assert run_status(client, held.run_id).lost == 0
    run = submit_jobs(client, spec("low"), jobs("SUB", 3), now=now).run_id
    client.set(f"refresher:run:{run}:submitting", 1, ex=60)  # as while its jobs are being added
    client.delete(stream_key("low"))
    assert run_status(client, run).lost == 0


def test_a_submit_killed_midway_shows_its_missing_jobs_lost_once_it_stops_enqueueing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or kill -9) of `jobs submit` after its first chunk of jobs: the run counts five, the stream holds
    two. It read 'queued, 3 pending' for good, and `--watch` waited for ever."""
    client = connect(redis_server.url)
    real = runs.enqueue

    def interrupted(client: redis.Redis, tier: str, payloads: list[str], **kwargs: Any) -> list[float]:
        real(client, tier, payloads[:2], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "enqueue", interrupted)
    monkeypatch.setattr(runs, "SUBMITTING_TTL", 1, raising=False)
    with pytest.raises(KeyboardInterrupt):
        submit_jobs(client, spec("normal"), jobs("HALF", 5), now=dt.datetime.now(dt.UTC))
    [run] = [r.run_id for r in list_runs(client)]
    assert run_status(client, run).lost == 0  # the submitter might still be adding them
    time.sleep(1.5)
    state = run_status(client, run)
    assert (state.state, state.lost, state.pending) == ("queued", 3, 2)
