"""Redis busy with another client's long script answers BUSY to every other command: the worker waits it out
like a restart. Real redis-server."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import redis

from refresher.jobs.queue import RETRY
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def test_a_worker_outlives_redis_busy_with_a_script(redis_server: RedisServer, tmp_path: Path) -> None:
    # BUSY was re-raised by the loop: it ended the worker's thread (a --burst worker's too, with jobs left).
    client = redis_server.client()
    client.config_set("busy-reply-threshold", 100)  # ms a script runs before others get BUSY (default 5 s)
    settings = Settings.from_env(
        {"REFRESHER_STATE_DIR": str(tmp_path / "state"), "FEATURE_STORE_PATH": str(tmp_path / "store")},
        engine="local",
    )
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
        time.sleep(0.3)  # the worker's loop under way
        looping.start()
        time.sleep(1.0)  # well past the threshold: every command of the worker meets BUSY
        redis_server.client().script_kill()
        looping.join(timeout=10)
        time.sleep(1.0)
        assert running.is_alive()  # its thread waited, then carried on
    finally:
        worker.stop.set()
        running.join(timeout=10)
    assert not running.is_alive()
