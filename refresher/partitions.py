"""Month partitions of ``ohlcv_1min``: a month's first rows arrive in a partition made and filled in one transaction.

Why: with ``wal_level=minimal`` (every engine we start runs with it), rows copied with ``COPY ... FREEZE`` into a
table created in the same transaction are written without WAL and already frozen, so no later reader rewrites
their pages to set hint bits. Measured in ``bench/bench_load.py`` (a new partition per month vs the same rows
into a plain table, same run).

Layout: ``ohlcv_1min`` is ``PARTITION BY RANGE (ts)``, one partition per UTC calendar month named
``ohlcv_1min_YYYY_MM``, and ``ohlcv_1min_default`` for rows of a month without its own (a row inserted by hand).
Segments are exchange-local months (``refresher.database``), partitions UTC months: a segment's rows may fall
in two partitions, which routing handles; the loader still deletes and copies by segment.

A new partition is a plain table with the month's CHECK constraint, filled with COPY FREEZE, given its
primary key (one sorted build), then attached. ``ATTACH PARTITION`` takes SHARE UPDATE EXCLUSIVE on the parent
(readers and writers of other months go on) and, thanks to the CHECK constraint, scans nothing but the default partition, which holds
no rows of that month (else the month's rows are routed into it as before). Creators take one transaction-scoped
advisory lock before their batch's DELETE: two creators then take turns instead of deadlocking on the default
partition (each deleting from it, then each wanting it exclusively to attach). So two loaders that create months
at once run one after the other; that is why two COPY streams into new months gained nothing. Without the lock
(four backtesting months, two connections, leaf tables only) they gained 1.25-1.33x on this 2-core machine, before
the fetcher's share of the cores: not worth a second lock order yet.

A database made before partitions (``ohlcv_1min`` a plain table) keeps working: its rows are copied as before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

# The tables that are partitioned by month when a database is created, and their time column.
PARTITIONED: dict[str, str] = {"ohlcv_1min": "ts"}
_CREATE_LOCK = "refresher.partitions.create"


class Copy(Protocol):
    """``refresher.load.copy_arrow``, passed in (the loader imports this module)."""

    def __call__(
        self,
        conn: psycopg.Connection[Any],
        table: str,
        columns: Sequence[str],
        data: pa.Table,
        *,
        freeze: bool = ...,
    ) -> None: ...


def partition_name(table: str, month: dt.date) -> str:
    return f"{table}_{month:%Y_%m}"


def month_bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The UTC range ``[first of the month, first of the next)`` of a month partition."""
    start = dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)
    return start, (start + dt.timedelta(days=32)).replace(day=1)


def is_partitioned(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)", (table,)).fetchone()
    return bool(row and row[0])


def months_of(data: pa.Table, column: str) -> list[dt.date]:
    """The UTC months the rows of ``data`` fall in, ascending."""
    return [_month(code) for code in _by_month(data.column(column))]


def existing_months(conn: psycopg.Connection[Any], table: str) -> set[dt.date]:
    """The months that have a partition of their own (by name: the partitions this module makes)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(%s)",
        (table,),
    ).fetchall()
    months: set[dt.date] = set()
    prefix = f"{table}_"
    for (name,) in rows:
        stamp = name[len(prefix) :]
        if (
            name.startswith(prefix)
            and len(stamp) == 7
            and stamp[4] == "_"
            and stamp.replace("_", "").isdigit()
        ):
            months.add(dt.date(int(stamp[:4]), int(stamp[5:]), 1))
    return months


def lock_for_new_months(conn: psycopg.Connection[Any], table: str, data: pa.Table) -> bool:
    """Before the batch deletes anything: whether ``data`` needs a partition that does not exist yet, and if so
    the creators' lock, held until the transaction ends (see the module docstring)."""
    column = PARTITIONED.get(table)
    if column is None or not is_partitioned(conn, table):
        return False
    if not set(months_of(data, column)) - existing_months(conn, table):
        return False
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_CREATE_LOCK,))
    return True


def copy_by_month(
    conn: psycopg.Connection[Any],
    table: str,
    columns: Sequence[str],
    data: pa.Table,
    copy: Copy,
    *,
    creating: bool,
) -> list[dt.date]:
    """COPY ``data`` into ``table``; with ``creating`` (``lock_for_new_months`` said so), the rows of each month
    without a partition go into a new one filled with COPY FREEZE. Returns the months created."""
    if not creating:
        copy(conn, table, columns, data)
        return []
    column = PARTITIONED[table]
    have = existing_months(conn, table)
    created: list[dt.date] = []
    routed = np.ones(data.num_rows, dtype=bool)
    for code, picked in _by_month(data.column(column)).items():
        month = _month(code)
        if month in have or _default_holds(conn, table, column, month):
            continue
        if picked is None:
            _create_filled(conn, table, column, columns, month, data, copy)
            routed[:] = False
        else:
            _create_filled(conn, table, column, columns, month, data.filter(pa.array(picked)), copy)
            routed &= ~picked
        created.append(month)
    if routed.any():
        copy(conn, table, columns, data if routed.all() else data.filter(pa.array(routed)))
    return created


def _create_filled(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    columns: Sequence[str],
    month: dt.date,
    rows: pa.Table,
    copy: Copy,
) -> None:
    name = partition_name(table, month)
    lo, hi = month_bounds(month)
    ident, col = sql.Identifier(name), sql.Identifier(column)
    conn.execute(
        sql.SQL(
            "CREATE TABLE {leaf} (LIKE {parent} INCLUDING DEFAULTS, CONSTRAINT {check} CHECK ({col} >= {lo} "
            "AND {col} < {hi}))"
        ).format(
            leaf=ident,
            parent=sql.Identifier(table),
            check=sql.Identifier(f"{name}_month"),
            col=col,
            lo=sql.Literal(lo),
            hi=sql.Literal(hi),
        )
    )
    copy(conn, name, columns, rows, freeze=True)
    # The key after the rows: one sorted build (the rows come in key order, so the sort is a pass) instead of
    # a B-tree insert per row, and like the rows it writes no WAL in the table's own transaction. Measured on
    # a month of backtesting bars (741,000 rows): 0.64-0.67 s vs 0.82-0.90 s with the key made first.
    conn.execute(
        sql.SQL("ALTER TABLE {leaf} ADD CONSTRAINT {pkey} PRIMARY KEY (symbol, {col})").format(
            leaf=ident, pkey=sql.Identifier(f"{name}_pkey"), col=col
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {parent} ATTACH PARTITION {leaf} FOR VALUES FROM ({lo}) TO ({hi})").format(
            parent=sql.Identifier(table), leaf=ident, lo=sql.Literal(lo), hi=sql.Literal(hi)
        )
    )


def _default_holds(conn: psycopg.Connection[Any], table: str, column: str, month: dt.date) -> bool:
    """Whether the default partition holds rows of ``month`` (then attaching the month's partition would fail)."""
    default = f"{table}_default"
    if conn.execute("SELECT to_regclass(%s)", (default,)).fetchone() == (None,):
        return False
    lo, hi = month_bounds(month)
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {d} WHERE {col} >= %s AND {col} < %s)").format(
        d=sql.Identifier(default), col=sql.Identifier(column)
    )
    row = conn.execute(query, (lo, hi)).fetchone()
    return bool(row and row[0])


def _by_month(values: pa.ChunkedArray | pa.Array) -> dict[int, np.ndarray[Any, np.dtype[np.bool_]] | None]:
    """Each UTC month the timestamps fall in, ascending, as ``year * 12 + month - 1``, with the mask of its
    rows (None: every row). The first and last instant decide first: a load batch is nearly always one month,
    and the month of every row costs more (about 0.5 s of a cold backtesting load)."""
    if len(values) == 0:
        return {}
    micros = np.asarray(values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(), dtype=np.int64)
    first, last = _month_codes(np.array([micros.min(), micros.max()]))
    if first == last:
        return {int(first): None}
    codes = _month_codes(micros)
    return {int(code): codes == code for code in np.unique(codes)}


def _month_codes(micros: np.ndarray[Any, np.dtype[np.int64]]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Each UTC instant's (microseconds since the epoch) month as ``year * 12 + month - 1``."""
    # numpy's month arithmetic on the UTC instants; pyarrow's pc.month converts each value through the zone
    months = micros.astype("datetime64[us]").astype("datetime64[M]")
    return months.astype(np.int64) + 1970 * 12


def _month(code: int) -> dt.date:
    return dt.date(code // 12, code % 12 + 1, 1)


__all__ = [
    "PARTITIONED",
    "copy_by_month",
    "existing_months",
    "is_partitioned",
    "lock_for_new_months",
    "month_bounds",
    "months_of",
    "partition_name",
]
