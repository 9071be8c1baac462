"""A worker's features lock is a fence: a worker held up past it writes nothing of the run once another holds it.
A real worker process stopped with SIGSTOP, a real redis-server, a real embedded Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from refresher.jobs.queue import FEATURES_DUE, connect, run_key
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_lost_jobs import _stopped
from tests.refresher.jobs.test_worker import status, submit, worker_log, workspace
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared

# The worker, which stops itself (SIGSTOP) once, when its first features step is computed and about to be written,
# as a process suspended there (or in a long pause) would be; SIGCONT resumes it.
_STOPS_AFTER_FEATURES = """
import os, signal, sys
from refresher import cli
from refresher.jobs import worker
real, stopped = worker.run_features, []
def stopping(*args, **kwargs):
    counts = real(*args, **kwargs)
    if not stopped:
        stopped.append(1)
        os.kill(os.getpid(), signal.SIGSTOP)
    return counts
worker.run_features = stopping
sys.exit(cli.main())
"""


def test_a_worker_stopped_past_its_features_lock_writes_nothing_once_another_holds_it(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """A worker stopped (SIGSTOP, a suspended machine, a long GC pause) past its features lock, its renewal stopped
    with it, while another worker took the lock: resumed, it marked the run complete with its features over
    whatever the other did. Its writes check the lock is still its own: one line, nothing written; the run stays
    due, and it completes once the lock is free again."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    run = submit(ws, url)["run_id"]
    client = connect(url)
    key = run_key(run, "features-lock")
    args = [
        "worker",
        "--queue",
        url,
        "--name",
        "fence",
        "--burst",
        "--visibility-timeout",
        "2",
        "--engine",
        ws.engine,
    ]
    with (ws.root / "worker-fence.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-c", _STOPS_AFTER_FEATURES, *args],
            env=ws.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not _stopped(worker.pid):
            assert worker.poll() is None and time.monotonic() < deadline, worker_log(ws, "fence")
            time.sleep(0.01)
        while client.exists(key):  # its lock expires, in Redis's own time
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = client.lock(key, timeout=600, blocking=False, thread_local=False)  # another worker's
        assert other.acquire()
        os.kill(worker.pid, signal.SIGCONT)
        while "features not written" not in worker_log(ws, "fence"):
            # before: it wrote the run complete and, drained, exited
            assert worker.poll() is None and time.monotonic() < deadline, worker_log(ws, "fence")
            time.sleep(0.05)
        state = status(ws, url, run)
        assert (state["state"], state["features"]) == ("loaded", None), state
        assert client.sismember(FEATURES_DUE, run)
        other.release()  # the other one is done, without writing: the run is still due
        assert worker.wait(timeout=300) == 0, worker_log(ws, "fence")
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGCONT)
            worker.kill()
            worker.wait()
    assert status(ws, url, run)["state"] == "complete"
    lines = [line for line in worker_log(ws, "fence").splitlines() if "features not written" in line]
    assert len(lines) == 1 and "held up past its 2 s features lock" in lines[0], lines
