"""A segment's rows in ``refresher_rejects`` describe its current load, through both entry points of the
segment jobs: the in-process batch (``load_tables``) and the queue's one delivery (``load_table``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest

from refresher.database import ensure_schema
from refresher.jobs.segment import SegmentJob, load_table, load_tables
from refresher.load import load_segment
from refresher.segments import Segment
from refresher.sources.validate import Reject
from tests.fixtures_postgres import daily_bars

pytestmark = pytest.mark.postgres
NY = "America/New_York"
SEGMENT = Segment("AAPL", "1d", dt.date(2024, 1, 1))
REJECT = Reject(SEGMENT, "bars.csv", 7, "high >= max(open, close)", "high", '{"high": "8"}')


@pytest.fixture
def conn(pg_conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    ensure_schema(pg_conn)
    pg_conn.commit()
    return pg_conn


def rejects(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM refresher_rejects").fetchone()[0])  # type: ignore[index]


@pytest.mark.parametrize("entry", ["load_tables", "load_table"])
def test_unchanged_rows_without_rejects_clear_the_old_ones(conn: psycopg.Connection[Any], entry: str) -> None:
    # quarantine then skip: the same good rows, so the same content hash; the load was a no-op and the
    # quarantined rows stayed, describing a load the database no longer holds
    table = daily_bars("AAPL", dt.date(2024, 1, 1), 10)
    load_segment(conn, SEGMENT, table, "same", tz=NY, rejects=[REJECT])
    assert rejects(conn) == 1
    job = SegmentJob(SEGMENT, "key", NY, stored_hash="same", loaded_hash="same")
    if entry == "load_tables":
        [outcome], _ = load_tables(conn, [(job, table, "same", None)])  # None: leave them as they are
        assert not outcome.loaded and rejects(conn) == 1
        [outcome], _ = load_tables(conn, [(job, table, "same", [])])
    else:
        assert not load_table(conn, job, table, "same", rejects=None).loaded and rejects(conn) == 1
        outcome = load_table(conn, job, table, "same", rejects=[])
    assert outcome.loaded and rejects(conn) == 0
    # then a no-op again: nothing in the table to clear
    if entry == "load_tables":
        [outcome], _ = load_tables(conn, [(job, table, "same", [])])
    else:
        outcome = load_table(conn, job, table, "same", rejects=[])
    assert not outcome.loaded
