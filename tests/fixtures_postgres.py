"""Fixtures for a real embedded PostgreSQL server (local engine).

The embedded binaries are a pip dependency, so a server that cannot start is a failure, never a skip.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA
from refresher.snapshot import drop_snapshot

PYTEST_PROFILE = "pytest_local"


_MADE: list[Path] = []


def world_traversable_tmp(prefix: str) -> Path:
    """A temp dir the server's OS user (``embedded_postgres`` under root) can enter: /tmp is, home dirs may not be.
    Removed when the test session ends (``pytest_sessionfinish``), with any server still running from it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    _MADE.append(path)
    return path


def _stop_postmasters_under(root: Path) -> None:
    """Stop (immediate shutdown) every postmaster whose data directory is under ``root``: what a test left running."""
    waiting = []
    for pidfile in root.rglob("postmaster.pid"):
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            os.kill(pid, signal.SIGQUIT)
        except (OSError, ValueError):
            continue
        waiting.append(pid)
    deadline = time.monotonic() + 10
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if Path(f"/proc/{pid}").exists()]
        time.sleep(0.05)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Each run used to leave its temp dirs in /tmp (about 300 MB a full run, clusters and stores included)."""
    while _MADE:
        path = _MADE.pop()
        _stop_postmasters_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def local_state_dir() -> Iterator[Path]:
    # One per xdist worker: session fixtures run once per worker process.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = world_traversable_tmp(f"refresher-pg-{worker}-")
    yield path
    # stop() removed the clusters; what is left is a lock file or two.
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    path.rmdir()


@pytest.fixture(scope="session")
def local_engine(local_state_dir: Path) -> Iterator[LocalEngine]:
    engine = LocalEngine(local_state_dir)
    try:
        yield engine
    finally:
        for status in engine.status():
            engine.stop(status.profile)


@pytest.fixture(scope="session")
def pg_server(local_engine: LocalEngine) -> ServerInfo:
    return local_engine.start(PYTEST_PROFILE)


@pytest.fixture
def pg_database(pg_server: ServerInfo) -> Iterator[ServerInfo]:
    """A fresh, empty database on the session server, dropped after the test; its ServerInfo names it."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    server = replace(pg_server, dbname=name)
    try:
        yield server
    finally:
        # Under the snapshot locks, so a background refiller cannot recreate a clone behind our back.
        drop_snapshot(server)
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_conn(pg_database: ServerInfo) -> Iterator[psycopg.Connection[Any]]:
    """A connection (not autocommit) to a fresh, empty database."""
    with psycopg.connect(pg_database.dsn()) as conn:
        yield conn


def minute_bars(symbol: str, first: dt.datetime, n: int, *, seed: int = 0) -> pa.Table:
    """``n`` synthetic minute bars of ``symbol`` from ``first`` (aware), one a minute, in MINUTE_SCHEMA."""
    start = np.datetime64(first.astimezone(dt.UTC).replace(tzinfo=None), "us")
    ts = start + np.arange(n).astype("timedelta64[m]")
    return _bars(symbol, pa.array(ts, pa.timestamp("us", tz="UTC")), n, seed, MINUTE_SCHEMA)


def daily_bars(symbol: str, month: dt.date, days: int, *, seed: int = 0) -> pa.Table:
    """One synthetic bar for each of the first ``days`` days of ``month``, in DAILY_SCHEMA."""
    dates = [month + dt.timedelta(days=i) for i in range(days)]
    return _bars(symbol, pa.array(dates, pa.date32()), days, seed, DAILY_SCHEMA)


def _bars(symbol: str, when: pa.Array, n: int, seed: int, schema: pa.Schema) -> pa.Table:
    rng = np.random.default_rng(seed)
    close = 100 + rng.standard_normal(n).cumsum()
    return pa.table(
        [
            pa.array([symbol] * n),
            when,
            close - 0.1,
            close + 0.5,
            close - 0.5,
            close,
            rng.integers(1, 10_000, n),
        ],
        schema=schema,
    )


def refills_gone(db: str) -> None:
    """Wait for the detached refills of ``db`` the CLI spawned (``pool.spawn_refill``) to end."""
    deadline = time.monotonic() + 120
    while any(
        "refresher.pool" in cmdline and "refill" in cmdline and db in cmdline
        for cmdline in (proc.info["cmdline"] or [] for proc in psutil.process_iter(["cmdline"]))
    ):
        assert time.monotonic() < deadline, f"a refill of {db} never ended"
        time.sleep(0.1)
