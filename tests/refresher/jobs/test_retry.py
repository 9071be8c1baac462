"""Transient vs permanent failures, and the backoff between attempts."""

from __future__ import annotations

import datetime as dt
import random
import socket

import psycopg
import pyarrow as pa
import pytest
import redis

from refresher.errors import LoadError
from refresher.jobs.retry import backoff_seconds, is_transient
from refresher.load import conform
from refresher.segments import Segment
from tests.fixtures_postgres import daily_bars


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_is_transient_even_wrapped_in_a_load_error() -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"host=127.0.0.1 port={_closed_port()} user=x dbname=x connect_timeout=2")
    wrapped = LoadError("AAPL/1d/2025-01: loading failed")
    wrapped.__cause__ = refused.value
    assert is_transient(refused.value) and is_transient(wrapped)
    with pytest.raises(redis.ConnectionError) as gone:
        redis.Redis(port=_closed_port(), socket_connect_timeout=1).ping()
    assert is_transient(gone.value)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.errors.SerializationFailure, True),
        (psycopg.errors.DeadlockDetected, True),
        (psycopg.errors.LockNotAvailable, True),
        (psycopg.errors.QueryCanceled, True),
        (psycopg.errors.UniqueViolation, False),
        (psycopg.errors.UndefinedColumn, False),
        (psycopg.errors.InvalidPassword, False),
    ],
)
def test_sqlstates_sort_into_retry_or_dead_letter(error: type[psycopg.Error], transient: bool) -> None:
    assert is_transient(error()) is transient


def test_rows_outside_their_segment_are_permanent() -> None:
    segment = Segment("AAPL", "1d", dt.date(2025, 1, 1))
    table: pa.Table = daily_bars("AAPL", dt.date(2025, 2, 1), 5)
    with pytest.raises(LoadError) as outside:
        conform(segment, table, "America/New_York")
    assert not is_transient(outside.value)


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    samples = {
        attempt: [backoff_seconds(attempt, base=0.5, cap=30, rng=rng) for _ in range(500)]
        for attempt in (1, 3, 10)
    }
    assert all(0 <= s <= 1.0 for s in samples[1]) and max(samples[1]) > 0.9
    assert all(0 <= s <= 4.0 for s in samples[3]) and max(samples[3]) > 3.5
    assert all(0 <= s <= 30 for s in samples[10]) and max(samples[10]) > 28
    assert len(set(samples[10])) == 500  # jittered: workers retrying together spread out
