"""Fixtures shared by the snapshot tests."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.load import load_segment
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars


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
