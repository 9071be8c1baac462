"""Redis busy with another client's long script answers BUSY to every other command: the worker waits it out
like a restart. Real redis-server."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from refresher.jobs import worker as worker_module
from refresher.jobs.queue import RETRY
from refresher.jobs.retry import backoff_seconds
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def test_a_worker_outlives_redis_busy_with_a_script(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BUSY was re-raised by the loop: it ended the worker's thread (a --burst worker's too, with jobs left).
    client = redis_server.client()
    client.config_set("busy-reply-threshold", 100)  # ms a script runs before others get BUSY (default 5 s)
    settings = Settings.from_env(
        {"REFRESHER_STATE_DIR": str(tmp_path / "state"), "FEATURE_STORE_PATH": str(tmp_path / "store")},
        engine="local",
    )
    # The worker's wait after a BUSY, seen: fixed sleeps (0.3 s for its loop, 1 s for the script) could kill a
    # script not yet running on a loaded machine (NOTBUSY), or end before the worker met BUSY at all.
    backed_off = threading.Event()

    def backoff(*args: Any, **kwargs: Any) -> float:
        backed_off.set()
        return backoff_seconds(*args, **kwargs)

    monkeypatch.setattr(worker_module, "backoff_seconds", backoff)
    # A retry due in an hour: a --burst worker never blocks in a read (a client blocked there is not answered
    # BUSY) and is not drained, so it goes on asking Redis.
    client.zadd(RETRY, {'{"run": "r-later", "tier": "normal"}': time.time() + 3600})
    worker = Worker(redis_server.url, settings, WorkerOptions("busy", burst=True))
    running = threading.Thread(target=worker.run, daemon=True)
    running.start()

    def loop() -> None:
        with contextlib.suppress(redis.ResponseError):  # 'Script killed by user with SCRIPT KILL'
            client.eval("while true do end", 0)

    looping = threading.Thread(target=loop, daemon=True)
    try:
        looping.start()
        deadline = time.monotonic() + 60
        while not _busy(redis_server):  # the script past the threshold: every command meets BUSY
            assert looping.is_alive() and time.monotonic() < deadline, "the script never made Redis busy"
            time.sleep(0.01)
        while not backed_off.wait(0.01):  # the worker met BUSY and waits
            assert running.is_alive(), "the worker's thread ended on BUSY"
            assert time.monotonic() < deadline, "the worker never met BUSY in 60 s"
        redis_server.client().script_kill()
        looping.join(timeout=60)
        assert not looping.is_alive()
        time.sleep(1.0)
        assert running.is_alive()  # its thread waited, then carried on
    finally:
        if looping.is_alive():  # failed before the kill: a busy Redis would not stop
            with contextlib.suppress(redis.ResponseError):
                redis_server.client().script_kill()
        worker.stop.set()
        running.join(timeout=60)
    assert not running.is_alive()


def _busy(redis_server: RedisServer) -> bool:
    """Whether Redis answers BUSY (a script running past the threshold) to a new client."""
    with redis_server.client() as asking:
        try:
            asking.ping()
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY ")
    return False
