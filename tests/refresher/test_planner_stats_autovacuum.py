"""The refill's analysis beside a user (``pool._analyze_working``) and autovacuum: a table an autovacuum VACUUM
holds is analyzed all the same (the server cancels the autovacuum when our wait for its lock outlasts
``deadlock_timeout``), while a table a user's transaction holds is skipped after a bounded wait. On a real
server of this module's own, whose autovacuum looks at its databases every second."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from refresher import pool
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from tests.fixtures_postgres import world_traversable_tmp

pytestmark = pytest.mark.postgres

# A loaded table's name (the analysis leaves a user's own tables to autovacuum). Its autovacuum VACUUM starts
# after any insert and crawls (a 100 ms sleep per page or so, some 300 pages); it never ANALYZEs it.
_TABLE = "ohlcv_daily"
_SLOW_VACUUM = (
    "autovacuum_vacuum_insert_threshold = 1, autovacuum_vacuum_insert_scale_factor = 0, "
    "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1, "
    "autovacuum_analyze_threshold = 2000000000"
)


@pytest.fixture(scope="module")
def autovacuuming() -> Iterator[ServerInfo]:
    engine = LocalEngine(world_traversable_tmp("refresher-autovacuum-") / "state")
    info = engine.start("pa_autovacuum")
    try:
        with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET autovacuum_naptime = '1s'")
            conn.execute("SELECT pg_reload_conf()")
        yield info
    finally:
        engine.stop("pa_autovacuum")


@pytest.fixture
def filled(autovacuuming: ServerInfo) -> Iterator[ServerInfo]:
    """A fresh database of that server, its ``_TABLE`` just filled and never analyzed."""
    name = f"pa_{time.monotonic_ns()}"
    with psycopg.connect(autovacuuming.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    server = replace(autovacuuming, dbname=name)
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {_TABLE} (n int, note text) WITH ({_SLOW_VACUUM})")
            conn.execute(f"INSERT INTO {_TABLE} SELECT n, repeat('x', 200) FROM generate_series(1, 10000) n")
            conn.execute("SELECT pg_stat_force_next_flush()")
        yield server
    finally:
        with psycopg.connect(autovacuuming.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _counts(server: ServerInfo) -> tuple[int, int]:
    """``_TABLE``'s ANALYZE count (not autovacuum's) and its rows changed since its last ANALYZE."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT analyze_count, n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = %s", (_TABLE,)
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _analyze_working(server: ServerInfo) -> None:
    """The refill's analysis of ``server``'s database, as it runs it (it closes the session)."""
    pool._analyze_working(psycopg.connect(server.dsn(), autocommit=True), ())


def _autovacuum_at(conn: psycopg.Connection[Any]) -> int | None:
    """The pid of the autovacuum worker VACUUMing ``_TABLE`` in ``conn``'s database, if one is."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' "
        "AND datname = current_database() AND query LIKE %s",
        (f"autovacuum: VACUUM %{_TABLE}%",),
    ).fetchone()
    return None if row is None else int(row[0])


def test_a_table_an_autovacuum_vacuum_holds_is_analyzed_all_the_same(filled: ServerInfo) -> None:
    with psycopg.connect(filled.dsn(), autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while _autovacuum_at(conn) is None:
            assert time.monotonic() < deadline, "autovacuum never began its VACUUM"
            time.sleep(0.1)
        _analyze_working(filled)
    assert _counts(filled) == (1, 0)  # analyzed by us, not skipped for the autovacuum's whole run


def test_a_table_a_users_transaction_holds_is_skipped_after_a_bounded_wait(filled: ServerInfo) -> None:
    with psycopg.connect(filled.dsn()) as user:
        user.execute(f"LOCK TABLE {_TABLE} IN ACCESS EXCLUSIVE MODE")  # idle in transaction, holding it
        _analyze_working(filled)  # returns: the wait is bounded
        assert user.execute("SELECT 1").fetchone() == (1,)  # not ended: the user's session goes first
        user.rollback()
    assert _counts(filled)[0] == 0
