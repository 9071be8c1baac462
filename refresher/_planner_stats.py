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

A database a reset or checkout hands out from a pristine copy not analyzed yet is analyzed after, in the
background, by a process that may be killed. So the handout records it, in the same transaction as the rename
that hands the database out (``record_pending``): a setting of that database, ``refresher.analyze_pending``
(``ALTER DATABASE ... SET``: a row of the shared catalog ``pg_db_role_setting``, keyed by the database's oid,
transactional, never copied by ``CREATE DATABASE ... TEMPLATE``), whose value names the tables to analyze
whatever the catalog says. Whoever comes next (the detached analyzer, the pytest plugin's refill thread, any
refill) finds every record in one query (``recorded``) and finishes it (``finish_recorded``): each table's
ANALYZE commits in one transaction with the record's update that drops it, the last one's with the record's
removal, so a kill -9 anywhere loses nothing and redoes at most one table. One finisher per database at a time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterator
from typing import Any

import psycopg
from psycopg import sql

# The tables refresher loads: by name, so the user's own tables in the database are left to autovacuum.
_LOADED = sql.SQL(
    "(c.relname IN ('symbols', 'ohlcv_daily', 'ohlcv_1min') OR starts_with(c.relname, 'ohlcv_1min_') "
    "OR starts_with(c.relname, 'features_') OR starts_with(c.relname, 'refresher_'))"
)
# Statistics through the pg_stats view, not pg_statistic: that catalog is a superuser's only, the view shows a
# role the columns it may read (a managed server's admin role owning the database, docs/engines.md).
_STALE = sql.SQL(
    "SELECT c.relname, c.relkind = 'p', p.relname, "
    "c.relkind = 'r' AND (c.relname = ANY(%s) OR pg_stat_get_mod_since_analyze(c.oid) > 0 "
    "  OR pg_relation_size(c.oid) / current_setting('block_size')::int <> c.relpages "
    "  OR (c.reltuples > 0 AND NOT EXISTS (SELECT 1 FROM pg_stats s "
    "    WHERE s.schemaname = current_schema() AND s.tablename = c.relname))), "
    "c.relkind = 'p' AND NOT EXISTS (SELECT 1 FROM pg_stats s "
    "  WHERE s.schemaname = current_schema() AND s.tablename = c.relname AND s.inherited) "
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
    """The names of ``stale_tables(conn)``: what a copy of ``conn``'s database taken now must analyze, the
    tables the analysis recorded on it names included (a handout's not finished yet: the copy does not carry
    the record, and its catalog cannot tell what the record is for)."""
    row = _own_record(conn)
    also = _split(row[0]) if row is not None and row[0] is not None else ()
    return tuple(name for name, _ in stale_tables(conn, also))


# The session's lock_timeout for an analysis beside a user (``wait_past_autovacuum``): the server's deadlock_timeout
# and a second more, in milliseconds.
_PAST_AUTOVACUUM = (
    "SELECT set_config('lock_timeout', (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000 "
    "+ 1000)::bigint::text, false)"
)


def wait_past_autovacuum(conn: psycopg.Connection[Any]) -> None:
    """Make ``conn``'s session give up a table's lock (``analyze_stale`` and ``finish_recorded`` then skip the
    table) after the server's ``deadlock_timeout`` and a second more: a user's DDL holding it goes first, and an
    autovacuum VACUUM holding it does not. The server cancels that only when a wait for its lock outlasts
    ``deadlock_timeout`` (the deadlock check finds it and signals it); a ``lock_timeout`` no longer than that
    (it was 1 s, the default ``deadlock_timeout``) fires with the check, whose interrupt raises first and the
    autovacuum is never signalled (PostgreSQL's ``ProcSleep``): the table was skipped for the autovacuum's whole
    run, and a VACUUM does not analyze (a fresh month's partition left out of date after a refill)."""
    conn.execute(_PAST_AUTOVACUUM)


def analyze_stale(conn: psycopg.Connection[Any], also: Collection[str] = ()) -> list[str]:
    """ANALYZE the loaded tables whose statistics are missing or out of date (``conn`` in autocommit: each its
    own transaction); returns their names. A table dropped meanwhile (a prune, a concurrent refresh) is skipped,
    and so is one whose lock does not come within the session's ``lock_timeout`` (a user's DDL holds it)."""
    done = []
    for name, partitioned in stale_tables(conn, also):
        try:
            conn.execute(_analyze(conn, name, partitioned))
        except (psycopg.errors.UndefinedTable, psycopg.errors.LockNotAvailable):
            continue
        done.append(name)
    return done


# The setting a handed-out database carries while its analysis is pending (see the module docstring), and the
# advisory lock (of that database: their keys are per database) its one finisher holds.
PENDING_SETTING = "refresher.analyze_pending"
_RECORD = sql.SQL("ALTER DATABASE {} SET refresher.analyze_pending = {}")
_CLEAR = sql.SQL("ALTER DATABASE {} RESET refresher.analyze_pending")
_SETTINGS = (
    "SELECT d.datname, substr(c, length(%(p)s) + 1) FROM pg_db_role_setting s "
    "JOIN pg_database d ON d.oid = s.setdatabase, unnest(s.setconfig) AS u(c) "
    "WHERE s.setrole = 0 AND starts_with(c, %(p)s) AND d.datallowconn AND NOT d.datistemplate"
)
# A database whose finisher is at it: its advisory lock (one bigint key: the high and low halves of the key in
# classid and objid, objsubid 1) is granted to a session there.
_FINISHING = (
    " AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = d.oid AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext(%(s)s))"
)
_PENDING_NAME = re.compile(r"^[a-z0-9_]+$")


def record_pending(name: str, tables: Collection[str]) -> sql.Composed:
    """The statement that records database ``name``'s analysis as pending, ``tables`` to be analyzed whatever its
    catalog says: run it in the transaction that hands ``name`` out. Only the loaded tables' lowercase names are
    kept (a user's own table is autovacuum's)."""
    return _RECORD.format(sql.Identifier(name), sql.Literal(_joined(tables)))


def may_record(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``conn``'s role may run ``record_pending``: a superuser (known without a query: the server reports
    ``is_superuser``), or from PostgreSQL 15 a role granted ``SET ON PARAMETER refresher.analyze_pending``. Any
    other role (a managed server's admin role owning its database) may not set the placeholder: its handouts go
    unrecorded, and their analysis is best effort (a killed analyzer leaves it to autovacuum, docs/engines.md)."""
    if conn.info.parameter_status("is_superuser") == "on":
        return True
    if conn.info.server_version < 150000:
        return False
    row = conn.execute(
        "SELECT has_parameter_privilege(current_user, %s, 'SET')", (PENDING_SETTING,)
    ).fetchone()
    return bool(row and row[0])


def recorded(conn: psycopg.Connection[Any], *, unattended: bool = False) -> dict[str, tuple[str, ...]]:
    """Every database of ``conn``'s server whose analysis is recorded as pending, with the tables it names
    (``conn``: on any database; the settings are in the shared catalog). ``unattended``: only those no finisher
    is at (``finishing``)."""
    rows = conn.execute(*recorded_query(unattended=unattended)).fetchall()
    return {str(name): _split(str(value)) for name, value in rows}


def recorded_query(*, unattended: bool = False) -> tuple[str, dict[str, str]]:
    """The query ``recorded`` runs, and its parameters: rows of (database, what its record says)."""
    return _SETTINGS + (_FINISHING if unattended else ""), {"p": f"{PENDING_SETTING}=", "s": PENDING_SETTING}


@contextlib.contextmanager
def finishing(conn: psycopg.Connection[Any]) -> Iterator[bool]:
    """Be the one analyzer of ``conn``'s database while the block runs: yields False at once when another one
    is (its session holds the database's advisory lock), True with the lock held (released after)."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (PENDING_SETTING,)).fetchone()
    ours = bool(row and row[0])
    try:
        yield ours
    finally:
        if ours and not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (PENDING_SETTING,))


def finish_recorded(conn: psycopg.Connection[Any], also: Collection[str] = ()) -> list[str] | None:
    """Finish the pending analysis recorded on ``conn``'s database (``conn`` in autocommit): ANALYZE what is out
    of date, what the record names and ``also``, each table in one transaction with the record's update that
    drops it. Returns the tables analyzed; [] when another finisher holds the database (it does the work; if it
    dies, the record stays for the next); None when nothing is recorded. A table dropped meanwhile is skipped;
    one whose lock does not come within the session's ``lock_timeout`` stays in the record, for the next."""
    with finishing(conn) as ours:
        return _finish_locked(conn, also) if ours else []


def _finish_locked(conn: psycopg.Connection[Any], also: Collection[str]) -> list[str] | None:
    row = _own_record(conn)
    if row is None or row[0] is None:
        return None
    # The name cannot change under us: a rename waits for every session on the database to end.
    database = sql.Identifier(str(row[1]))
    plan = stale_tables(conn, also={*_split(str(row[0])), *also})
    left = [name for name, _ in plan]
    done: list[str] = []
    cleared = False
    for name, partitioned in plan:
        rest = [other for other in left if other != name]
        try:
            with conn.transaction():
                conn.execute(_analyze(conn, name, partitioned))
                conn.execute(
                    _RECORD.format(database, sql.Literal(_joined(rest))) if rest else _CLEAR.format(database)
                )
        except psycopg.errors.UndefinedTable:
            left = rest
            continue
        except psycopg.errors.LockNotAvailable:
            continue
        left, cleared = rest, not rest
        done.append(name)
    if not left and not cleared:  # nothing was out of date, or the last tables were dropped meanwhile
        conn.execute(_CLEAR.format(database))
    return done


def _own_record(conn: psycopg.Connection[Any]) -> tuple[str | None, str] | None:
    """The analysis recorded on ``conn``'s database (None: none) and the database's name."""
    row = conn.execute(
        "SELECT (SELECT substr(c, length(%(p)s) + 1) FROM pg_db_role_setting s, unnest(s.setconfig) AS u(c) "
        "WHERE s.setrole = 0 AND s.setdatabase = d.oid AND starts_with(c, %(p)s)), d.datname "
        "FROM pg_database d WHERE d.datname = current_database()",
        {"p": f"{PENDING_SETTING}="},
    ).fetchone()
    return None if row is None else (None if row[0] is None else str(row[0]), str(row[1]))


def _analyze(conn: psycopg.Connection[Any], name: str, partitioned: bool) -> sql.Composed:
    """ANALYZE ``name``; a partitioned table's own statistics only, where the server can (PostgreSQL 18)."""
    only = partitioned and conn.info.server_version >= 180000
    return sql.SQL("ANALYZE {}{}").format(sql.SQL("ONLY " if only else ""), sql.Identifier(name))


def _joined(tables: Collection[str]) -> str:
    return ",".join(sorted({name for name in tables if _PENDING_NAME.match(name)}))


def _split(value: str) -> tuple[str, ...]:
    return tuple(name for name in value.split(",") if name)


__all__ = [
    "PENDING_SETTING",
    "analyze_stale",
    "finish_recorded",
    "finishing",
    "may_record",
    "record_pending",
    "recorded",
    "stale_names",
    "stale_tables",
    "wait_past_autovacuum",
]
