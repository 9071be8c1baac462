"""A failed features attempt's backoff takes its lock's place in one step, and a lock lost to a late renewal counts
as a failed attempt. A real redis-server and the real ``Worker._features``; the features step itself stands in (no
database: what it does under the lock is not what these tests are about)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis

from refresher.jobs import worker as worker_module
from refresher.jobs.queue import FEATURES_DUE, JobQueue, connect, run_key
from refresher.jobs.runs import submit_jobs
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_queue import NOW, jobs, spec

pytestmark = pytest.mark.redis


def _due(client: redis.Redis) -> str:
    """A run whose segments are all loaded: its features due."""
    run = submit_jobs(client, spec("normal"), jobs("FEAT", 1), now=NOW).run_id
    client.hset(run_key(run), "state", "loaded")
    client.sadd(FEATURES_DUE, run)
    return run


def _worker(url: str, tmp_path: Path, **options: Any) -> Worker:
    env = {"REFRESHER_STATE_DIR": str(tmp_path / "state"), "FEATURE_STORE_PATH": str(tmp_path / "store")}
    return Worker(url, Settings.from_env(env, engine="local"), WorkerOptions("w", burst=True, **options))


def test_a_failed_features_attempt_hands_its_lock_to_the_backoff_never_free_in_between(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff was set after the lock's release: another worker's sweep in between took the lock and tried
    again at once, its own SET NX then refused."""
    client = connect(redis_server.url)
    run = _due(client)
    key = run_key(run, "features-lock")

    def failing(*args: Any) -> None:
        raise RuntimeError("the features step failed")

    slipped_in: list[bool] = []
    release = redis.lock.Lock.release

    def released(lock: redis.lock.Lock) -> None:
        try:
            release(lock)
        finally:  # another worker's sweep, right then
            slipped_in.append(bool(client.set(key, "another worker", nx=True, px=60_000)))

    monkeypatch.setattr(Worker, "_features_locked", failing)
    monkeypatch.setattr(redis.lock.Lock, "release", released)
    monkeypatch.setattr(worker_module, "backoff_seconds", lambda *args, **kwargs: 30.0)
    worker = _worker(redis_server.url, tmp_path)
    worker._features(JobQueue(worker.client), {}, run)

    assert slipped_in == [False]
    assert client.get(key) == b"backoff" and 25_000 < client.pttl(key) <= 30_000
    assert client.hget(run_key(run), "features_attempts") == b"1" and client.sismember(FEATURES_DUE, run)


def test_a_features_lock_lost_to_a_late_renewal_counts_as_a_failed_attempt(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that outlives its lock every time (its renewal late: a pause, an overloaded machine), no other worker
    on the run, wrote nothing and was tried again at once, for ever, never counted: a --burst worker never ended.
    Each such attempt counts (transient); after the last the run is incomplete."""
    client = connect(redis_server.url)
    run = _due(client)

    def outlived(self: Worker, queue: JobQueue, contexts: Any, run: str, lock: redis.lock.Lock) -> None:
        time.sleep(1.5)  # past its 1 s lock, which no renewal reached
        if not lock.owned():  # as the step's own look before it writes
            raise worker_module._LockLost

    monkeypatch.setattr(redis.lock.Lock, "reacquire", lambda lock: None)  # the renewal, always too late
    monkeypatch.setattr(Worker, "_features_locked", outlived)
    worker = _worker(redis_server.url, tmp_path, visibility_timeout=1, max_attempts=2, backoff_cap=0.05)
    queue = JobQueue(worker.client)
    deadline = time.monotonic() + 30
    while client.sismember(FEATURES_DUE, run):  # the sweeps of the worker
        assert time.monotonic() < deadline, client.hgetall(run_key(run))
        worker._features(queue, {}, run)
        time.sleep(0.05)

    state = client.hgetall(run_key(run))
    assert state[b"state"] == b"incomplete" and state[b"features_attempts"] == b"2", state
    assert state[b"error"].startswith(
        b"features: transient: features not written: this worker was held up past"
    )
