"""Fixtures shared by the snapshot tests and the CLI tests."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.load import load_segment
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars, minute_bars, world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

JAN = dt.date(2024, 1, 1)


def load_now(server: ServerInfo, segment: Segment, table: Any) -> None:
    """Load ``segment`` into ``server``'s database in a session of its own."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        load_segment(conn, segment, table, uuid.uuid4().hex, tz="UTC")
        # Its activity counters reach the server now, not at the session's exit a moment after this returns.
        conn.execute("SELECT pg_stat_force_next_flush()")


@pytest.fixture
def bars(pg_database: ServerInfo) -> ServerInfo:
    """A database holding January 2024 of AAPL: 21 daily bars and 2,000 minute bars (its own month partition)."""
    load_now(pg_database, Segment("AAPL", "1d", JAN), daily_bars("AAPL", JAN, 21))
    first = dt.datetime(2024, 1, 2, 14, 30, tzinfo=dt.UTC)
    load_now(pg_database, Segment("AAPL", "1m", JAN), minute_bars("AAPL", first, 2000))
    return pg_database


@pytest.fixture
def loaded(pg_database: ServerInfo) -> ServerInfo:
    """A database holding one loaded segment: 21 daily bars of AAPL, January 2024."""
    with psycopg.connect(pg_database.dsn()) as conn:
        ensure_schema(conn)
        load_segment(
            conn,
            Segment("AAPL", "1d", dt.date(2024, 1, 1)),
            daily_bars("AAPL", dt.date(2024, 1, 1), 21),
            "h",
            tz="UTC",
        )
    return pg_database


@pytest.fixture
def cpu_load() -> Iterator[None]:
    """Two spinning processes: the machine is as busy as a full test run makes it."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.fixture(scope="module")
def checkout() -> Iterator[Workspace]:
    """A profile (two symbols, one month) refreshed once through the CLI on the local engine; the calendar cache
    is warm after it, and the refresh stamp written."""
    ws = Workspace(world_traversable_tmp("refresher-cli-"), "local", f"cli_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    try:
        ws.refresh()
        yield ws
    finally:
        ws.down()
