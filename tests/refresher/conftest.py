"""Fixtures shared by the snapshot tests and the CLI tests."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.load import load_segment
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars, world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace


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
