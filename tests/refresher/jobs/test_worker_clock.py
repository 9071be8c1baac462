"""A worker on a machine whose clock is off schedules by Redis's clock: it neither releases a ``--when-closed``
run early nor promotes a retry before its backoff. Real redis-server, a real worker process whose every
``time.time()`` reads two hours ahead."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refresher.jobs.queue import RETRY, JobQueue, connect, stream_key
from refresher.jobs.runs import run_status, submit_jobs
from tests.child_processes import reap
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_queue import jobs, spec

pytestmark = pytest.mark.redis

AHEAD = 2 * 3600

# The worker's process with the machine's clock two hours fast, as NTP gone wrong would have it.
SKEWED = f"""
import sys, time
real = time.time
time.time = lambda: real() + {AHEAD}
from refresher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_worker_whose_clock_runs_ahead_releases_and_promotes_by_redis_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    client = connect(redis_server.url)
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    held = submit_jobs(client, spec("normal"), jobs("HELD", 3), now=when, held_until_ts=now + 3600)
    backing_off = submit_jobs(client, spec("normal"), jobs("RETRY", 1), now=when)
    [delivery] = JobQueue(client).read("first", block_ms=0)
    JobQueue(client).retry_later(delivery, due=now + 3600)  # its backoff ends in an hour, by Redis's clock

    env = {
        **os.environ,
        "REFRESHER_STATE_DIR": str(tmp_path / "state"),
        "FEATURE_STORE_PATH": str(tmp_path / "store"),
        "REFRESHER_PROFILES": str(tmp_path / "profiles"),
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", SKEWED, "worker", "--queue", redis_server.url, "--name", "ahead"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any("b" in c["flags"] for c in client.client_list()):  # the worker waits for jobs
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)  # a sweep before its first wait, and several since: each promotes and releases
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            _, stderr = worker.communicate(timeout=60)
        finally:
            reap(worker)
    assert worker.returncode == 0 and "Traceback" not in stderr, stderr
    state = run_status(client, held.run_id)
    assert (state.state, state.held) == ("held", 3)  # released two hours early, the exchange trading
    assert client.zcard(RETRY) == 1 and client.xlen(stream_key("normal")) == 0
    assert run_status(client, backing_off.run_id).retrying == 1
