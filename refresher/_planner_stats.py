"""Planner statistics of the loaded tables: which are missing or out of date, and ANALYZE for just those.

A month partition is created, filled with COPY FREEZE and given its key in one transaction: it has row counts (the
key's build sets them) but no column statistics until autovacuum gets to it, a minute or more later and in the
working database only. The pristine copy and its clones (a reset, a test's database) planned every query with
default selectivities. ANALYZE of each new month in its load transaction cost a warm backtesting refresh's
segments phase about 0.4 s (12 months x 65 ms on two loaders, measured A/B): the refill process analyzes
instead, before it clones (``refresher.pool``), the working database beside it.

Out of date: a table written since its last ANALYZE by this database's activity counters
(``n_mod_since_analyze``); one whose size in pages is not what its last ANALYZE, VACUUM or key build recorded in
``pg_class.relpages`` (rows appended, a segment reloaded); or one with rows and no statistics. A copy of a
database starts with zeroed counters, so in the pristine copy only the catalog speaks, and a change within a
table's last page (a small table's reload) goes unseen: those the copy's mark records (``pending``: the working
database's counters when it was copied, or the tables a replay wrote), and the refill adds what the working
database's counters say now (``also``). A partitioned table's own statistics (of the whole, ``stainherit``) are out of date when any of
its partitions is, or when it has none.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import psycopg
from psycopg import sql

# The tables refresher loads: by name, so the user's own tables in the database are left to autovacuum.
_LOADED = sql.SQL(
    "(c.relname IN ('symbols', 'ohlcv_daily', 'ohlcv_1min') OR starts_with(c.relname, 'ohlcv_1min_') "
    "OR starts_with(c.relname, 'features_') OR starts_with(c.relname, 'refresher_'))"
)
_STALE = sql.SQL(
    "SELECT c.relname, c.relkind = 'p', p.relname, "
    "c.relkind = 'r' AND (c.relname = ANY(%s) OR pg_stat_get_mod_since_analyze(c.oid) > 0 "
    "  OR pg_relation_size(c.oid) / current_setting('block_size')::int <> c.relpages "
    "  OR (c.reltuples > 0 AND NOT EXISTS (SELECT 1 FROM pg_statistic s WHERE s.starelid = c.oid))), "
    "c.relkind = 'p' AND NOT EXISTS (SELECT 1 FROM pg_statistic s WHERE s.starelid = c.oid AND s.stainherit) "
    "FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid LEFT JOIN pg_class p ON p.oid = i.inhparent "
    "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p') AND {} ORDER BY 1"
).format(_LOADED)


def stale_tables(conn: psycopg.Connection[Any], also: Collection[str] = ()) -> list[tuple[str, bool]]:
    """The loaded tables of ``conn``'s database whose statistics are missing or out of date, each with whether
    it is partitioned, in the order to ANALYZE them: partitions before their parent. Before PostgreSQL 18 (no
    ``ANALYZE ONLY``) a partitioned table's ANALYZE covers its partitions too, so they are not named apart.
    ``also``: tables to count as out of date whatever this database says (see the module docstring)."""
    rows = conn.execute(_STALE, (list(also),)).fetchall()
    partitioned = {name for name, is_partitioned, *_ in rows if is_partitioned}
    leaves = [
        (name, parent) for name, is_partitioned, parent, stale, _ in rows if not is_partitioned and stale
    ]
    parents = {name for name, is_partitioned, _, _, bare in rows if is_partitioned and (bare or name in also)}
    parents |= {parent for _, parent in leaves if parent in partitioned}
    if conn.info.server_version < 180000:
        leaves = [(name, parent) for name, parent in leaves if parent not in parents]
    return [(name, False) for name, _ in leaves] + [(name, True) for name in sorted(parents)]


def stale_names(conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    """The names of ``stale_tables(conn)``: what a copy of ``conn``'s database taken now must analyze."""
    return tuple(name for name, _ in stale_tables(conn))


def analyze_stale(conn: psycopg.Connection[Any], also: Collection[str] = ()) -> list[str]:
    """ANALYZE the loaded tables whose statistics are missing or out of date (``conn`` in autocommit: each its
    own transaction); returns their names. A table dropped meanwhile (a prune, a concurrent refresh) is skipped,
    and so is one whose lock does not come within the session's ``lock_timeout`` (a user's DDL holds it)."""
    only = sql.SQL("ONLY ") if conn.info.server_version >= 180000 else sql.SQL("")
    done = []
    for name, partitioned in stale_tables(conn, also):
        try:
            conn.execute(
                sql.SQL("ANALYZE {}{}").format(only if partitioned else sql.SQL(""), sql.Identifier(name))
            )
        except (psycopg.errors.UndefinedTable, psycopg.errors.LockNotAvailable):
            continue
        done.append(name)
    return done


__all__ = ["analyze_stale", "stale_names", "stale_tables"]
