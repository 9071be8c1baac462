"""The local engine after what users do around it: a server caught shutting down."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import psycopg
import pytest

from refresher.engines.local import STOPPING, LocalEngine, Postmaster

pytestmark = pytest.mark.postgres


def _kept(info_dsn: str) -> object:
    with psycopg.connect(info_dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT answer FROM kept").fetchone()
    return row[0] if row else None


def test_a_start_while_the_server_shuts_down_waits_for_it_then_starts_it_again(engine: LocalEngine) -> None:
    # A `down` killed (or Ctrl-C'd) during its `pg_ctl stop`: the postmaster goes on shutting down. The next
    # refresh took it for the running server, polled logins it refused, and failed once it exited.
    info = engine.start("lr_stopping")
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    pgdata = engine.base / "lr_stopping" / "pgdata"
    postmaster = Postmaster.read(pgdata)
    assert postmaster is not None
    # The shutdown checkpoint holds the shutdown open until the checkpointer runs again.
    [checkpointer] = [
        child
        for child in psutil.Process(postmaster.pid).children()
        if "checkpointer" in " ".join(child.cmdline())
    ]
    checkpointer.suspend()
    os.kill(postmaster.pid, signal.SIGINT)  # what `pg_ctl stop -m fast` sends
    deadline = time.monotonic() + 30
    while (seen := Postmaster.read(pgdata)) is None or seen.status != STOPPING:
        assert time.monotonic() < deadline, "the postmaster never began its shutdown"
    resume = threading.Timer(1.0, checkpointer.resume)
    resume.start()
    try:
        again = engine.start("lr_stopping")
    finally:
        resume.join()
    assert _kept(again.dsn()) == 42
    running = Postmaster.read(pgdata)
    assert running is not None and running.pid != postmaster.pid and running.alive()
