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
(readers and writers of other months go on, but a second ATTACH waits for the first's commit) and ACCESS
EXCLUSIVE on the default partition, which it scans (thanks to the CHECK constraint, the new table is not); the
default holds no rows of that month (else the month's rows are routed into it as before). The same on PG 12 and
later, so on both engines (15 and 18).

Two loaders fill two new months at once; the lock order that keeps them from deadlocking, in every loader:

1. the segments' advisory locks (``refresher.load``), ascending;
2. each new month's advisory lock (``lock_new_months``), ascending; then the months without a partition are
   read again: two loaders of one month take turns, and the second finds it made;
3. fill: CREATE TABLE, COPY FREEZE, primary key (``fill_new_months``). This touches only the new table (and the
   parent's definition, ACCESS SHARE, for ``LIKE``), so the bulk of the work runs beside another loader's;
4. the creators' advisory lock (``lock_creators``), only a batch that filled a partition;
5. the default partition's lock (``lock_default``): ACCESS EXCLUSIVE for a batch that filled a partition (its
   ATTACH's, taken before its DELETE), ROW EXCLUSIVE for one that deletes through the parent (its DELETE's);
6. the batch's DELETE through the parent, the default partition's check, ATTACH, the other rows' COPY through
   the parent, the ledger rows; commit.

No loader holds a lock on the default partition before step 4 (the check that reads it is in step 6), and
only one is past step 4 at a time, so a creator's ATTACH waits at most for loaders without new months (whose
DELETE or COPY may touch the default); those take nothing but their own segments' rows and ROW EXCLUSIVE on the
tables, which the ATTACH's locks let through or make wait, never the other way round.
Before, the creators' lock was taken first (before the DELETE) and held through the fill, so two loaders that
created months ran one after the other.

A database made before partitions (``ohlcv_1min`` a plain table) keeps working: its rows are copied as before.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from refresher.errors import LoadError
from refresher.fence import (
    NAMED_HELD,
    PAIRS_HELD,
    RELATION_HELD,
    advisory_locked,
    held_by,
    waited_ending_stalled,
)

# The tables that are partitioned by month when a database is created, and their time column.
PARTITIONED: dict[str, str] = {"ohlcv_1min": "ts"}
_CREATE_LOCK = "refresher.partitions.create"
# The modes ``lock_default`` takes the default partition in: a batch that attaches a month (its ATTACH's), one
# that deletes through the parent (its DELETE's), a read through the parent (the ACCESS SHARE its plan takes).
ATTACHING, DELETING, READING = "ACCESS EXCLUSIVE", "ROW EXCLUSIVE", "ACCESS SHARE"


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


def months_of_range(first: dt.datetime, last: dt.datetime) -> list[dt.date]:
    """The UTC months from the one of instant ``first`` to the one of ``last``, ascending."""
    low, high = (_code(moment.astimezone(dt.UTC).date()) for moment in (first, last))
    return [_month(code) for code in range(low, high + 1)]


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


def lock_new_months(
    conn: psycopg.Connection[Any], table: str, data: pa.Table | Collection[dt.date], *, wait: float
) -> list[dt.date]:
    """Before anything else of the batch's table is touched: the months of ``data`` (its rows', or the months
    given: a batch of COPY bodies, ``refresher.bodies``) without a partition, each under its month's lock
    (ascending), read again once the locks are held (another loader may have made one).

    Two loaders of one new month take turns here; of two different months, both go on (see the module
    docstring for the lock order). Bounded: a loader stopped while filling the month (SIGSTOP, in its COPY
    FREEZE) held its lock for as long as it stayed stopped, and the other loaders of that month (other symbols)
    waited as long, for ever. Past ``wait`` such a session is ended (``refresher.fence.advisory_locked``); a live
    one is waited for as long as it runs, one idle inside its transaction past it is a LoadError naming it (a
    lock timeout: transient)."""
    column = PARTITIONED.get(table)
    if column is None or not is_partitioned(conn, table):
        return []
    wanted = set(months_of(data, column) if isinstance(data, pa.Table) else data) - existing_months(
        conn, table
    )
    if not wanted:
        return []
    keys = (f"{_CREATE_LOCK}.{table}", sorted(_code(month) for month in wanted))
    try:
        advisory_locked(
            conn,
            wait,
            "k, code",
            "(SELECT hashtext(%s) AS k, unnest(%s::int[]) AS code) c",
            keys,
            PAIRS_HELD,
            keys,
        )
    except psycopg.errors.LockNotAvailable as exc:
        raise LoadError(
            f"{table}: another load making the partition of {', '.join(f'{m:%Y-%m}' for m in sorted(wanted))} "
            f"held its lock for over {wait:g} s ({held_by(conn, PAIRS_HELD, keys)}); try again once it is done"
        ) from exc
    return sorted(wanted - existing_months(conn, table))


@dataclass(frozen=True)
class MonthFill:
    """A batch's rows of one table: the partitions of its new months made and filled (not attached yet), and
    which rows still go through the parent."""

    table: str
    columns: Sequence[str]
    data: pa.Table
    # Each new month's partition, with the mask of its rows (None: every row of ``data``).
    filled: dict[dt.date, np.ndarray[Any, np.dtype[np.bool_]] | None]
    # The rows of months that already have a partition (or no partitions at all).
    routed: np.ndarray[Any, np.dtype[np.bool_]]


def fill_new_months(
    conn: psycopg.Connection[Any],
    table: str,
    columns: Sequence[str],
    data: pa.Table,
    copy: Copy,
    months: Sequence[dt.date],
) -> MonthFill:
    """Make each of ``months`` (``lock_new_months``) a partition of its own and fill it with COPY FREEZE and its
    primary key: the bulk of a cold load, done before the creators' lock, touching no table another loader
    uses."""
    routed = np.ones(data.num_rows, dtype=bool)
    filled: dict[dt.date, np.ndarray[Any, np.dtype[np.bool_]] | None] = {}
    if months:
        wanted = set(months)
        for code, picked in _by_month(data.column(PARTITIONED[table])).items():
            month = _month(code)
            if month not in wanted:
                continue
            rows = data if picked is None else data.filter(pa.array(picked))
            create_filled(conn, table, month, functools.partial(_frozen, copy, conn, columns, rows))
            filled[month] = picked
            if picked is None:
                routed[:] = False
            else:
                routed &= ~picked
    return MonthFill(table, columns, data, filled, routed)


def _frozen(
    copy: Copy, conn: psycopg.Connection[Any], columns: Sequence[str], rows: pa.Table, name: str
) -> None:
    copy(conn, name, columns, rows, freeze=True)


def lock_creators(conn: psycopg.Connection[Any], *, wait: float) -> None:
    """The creators' lock, until the transaction ends: taken after a batch filled its new partitions and before
    it touches the parent (its DELETE, the default partition, the ATTACH); see the module docstring. Bounded as
    ``lock_new_months``: a creator stopped in the COPY after its ATTACH held it for ever."""
    try:
        advisory_locked(conn, wait, "k", "hashtext(%s) AS k", (_CREATE_LOCK,), NAMED_HELD, (_CREATE_LOCK,))
    except psycopg.errors.LockNotAvailable as exc:
        raise LoadError(
            f"another load attaching a new month's partition held the creators' lock for over {wait:g} s "
            f"({held_by(conn, NAMED_HELD, (_CREATE_LOCK,))}); try again once it is done"
        ) from exc


def lock_default(conn: psycopg.Connection[Any], table: str, *, mode: str, wait: float) -> None:
    """Step 5 of the lock order: ``table``'s default partition (when it has one) locked until the transaction
    ends, before the batch's first statement on the parent, in ``mode``: ``ATTACHING``, the lock its ATTACH
    takes, ``DELETING``, its DELETE's (which reaches the default unless every month of its range has a
    partition, and with a generic plan even then), or ``READING``, a read's through the parent (``--verify``'s
    counts, ``refresher.database.count_rows``: its plan locks every partition it cannot prune, the default
    among them). Afterwards no statement of the batch waits on the default.

    Bounded as the advisory locks (``refresher.fence.waited_ending_stalled``, patient): a loader stopped in its
    COPY (SIGSTOP, a suspended machine) holding a lock on the default (its DELETE reached it; or it attached a
    month, the COPY through the parent after it) kept it for as long as it stayed stopped, and a creator's ATTACH,
    or after one a DELETE through the parent, waited as long: for ever. Past ``wait`` such a session, its COPY
    having read nothing all along, is ended; a live one is waited for as long as it runs; one idle inside its
    transaction the whole wait is a LoadError naming it (a lock timeout: transient). A read took ACCESS SHARE in
    its plan, without bound: beside a creator stopped after its ATTACH it waited for ever."""
    if table not in PARTITIONED:
        return
    default = f"{table}_default"
    # One statement whether or not the default exists (a database made before partitions has none).
    locked = sql.SQL(
        "DO $$ BEGIN IF to_regclass({name}) IS NOT NULL THEN LOCK TABLE {leaf} IN {mode} MODE; END IF; END $$"
    )
    query = locked.format(name=sql.Literal(default), leaf=sql.Identifier(default), mode=sql.SQL(mode))
    try:
        waited_ending_stalled(conn, wait, query.as_string(conn), (), RELATION_HELD, (default,), patient=True)
    except psycopg.errors.LockNotAvailable as exc:
        raise LoadError(
            f"{table}: another load held its default partition {default} for over {wait:g} s "
            f"({held_by(conn, RELATION_HELD, (default,))}); try again once it is done"
        ) from exc


def attach_and_copy(conn: psycopg.Connection[Any], fill: MonthFill, copy: Copy) -> list[dt.date]:
    """Under the creators' lock (when ``fill`` made partitions) and after the batch's DELETE: attach each filled
    partition, then COPY the other rows through the parent. Returns the months attached.

    A month the default partition holds rows of (a row inserted by hand) cannot have a partition: its filled
    table is dropped and its rows go through the parent into the default, as they always did. That is known
    only here, because reading the default earlier would hold a lock the ATTACH of another loader waits for."""
    routed = fill.routed.copy()
    attached: list[dt.date] = []
    for month, picked in fill.filled.items():
        if attach_filled(conn, fill.table, month):
            attached.append(month)
        elif picked is None:
            routed[:] = True
        else:
            routed |= picked
    if routed.any():
        data = fill.data if routed.all() else fill.data.filter(pa.array(routed))
        copy(conn, fill.table, fill.columns, data)
    return attached


def attach_filled(conn: psycopg.Connection[Any], table: str, month: dt.date) -> bool:
    """``attach_and_copy`` of one filled month: attached, or (the default partition holds rows of the month)
    dropped, and False: its rows are to go through the parent."""
    leaf = sql.Identifier(partition_name(table, month))
    if _default_holds(conn, table, PARTITIONED.get(table, ""), month):
        conn.execute(sql.SQL("DROP TABLE {}").format(leaf))
        return False
    lo, hi = month_bounds(month)
    conn.execute(
        sql.SQL("ALTER TABLE {parent} ATTACH PARTITION {leaf} FOR VALUES FROM ({lo}) TO ({hi})").format(
            parent=sql.Identifier(table), leaf=leaf, lo=sql.Literal(lo), hi=sql.Literal(hi)
        )
    )
    return True


def create_filled(
    conn: psycopg.Connection[Any], table: str, month: dt.date, write: Callable[[str], object]
) -> None:
    """``month``'s partition of ``table`` made (not attached), filled by ``write(its name)`` with COPY FREEZE
    in this transaction, and given its primary key: step 3 of the lock order (``fill_new_months``)."""
    name = partition_name(table, month)
    lo, hi = month_bounds(month)
    ident, col = sql.Identifier(name), sql.Identifier(PARTITIONED[table])
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
    write(name)
    # The key after the rows: one sorted build (the rows come in key order, so the sort is a pass) instead of
    # a B-tree insert per row, and like the rows it writes no WAL in the table's own transaction. Measured on
    # a month of backtesting bars (741,000 rows): 0.64-0.67 s vs 0.82-0.90 s with the key made first; the warm
    # backtesting load's server CPU 8.3 vs 11.4 s (docs/architecture.md, "Where the load's CPU goes").
    # Built by this backend alone: the loaders already fill two months at once, one core each, and a parallel
    # build (the server's choice for a month this size: two workers) only adds its own work: each worker sorts
    # its share to tape, the leader maps 256 MB of tape buffers and merges them. Warm backtesting load: the
    # server's CPU 9.3 -> 8.2 s (docs/architecture.md, "Where the load's CPU goes").
    conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
    conn.execute(
        sql.SQL("ALTER TABLE {leaf} ADD CONSTRAINT {pkey} PRIMARY KEY (symbol, {col})").format(
            leaf=ident, pkey=sql.Identifier(f"{name}_pkey"), col=col
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
    numbers = values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    # The extremes from Arrow, over the chunks where they lie: the column as one numpy array is a copy of the
    # batch's times (a month of backtesting bars, 6 MB into fresh pages), needed only when two months share it.
    extremes = pc.min_max(numbers)
    first, last = _month_codes(np.array([extremes["min"].as_py(), extremes["max"].as_py()], dtype=np.int64))
    if first == last:
        return {int(first): None}
    codes = _month_codes(np.asarray(numbers.to_numpy(), dtype=np.int64))
    return {int(code): codes == code for code in np.unique(codes)}


def _month_codes(micros: np.ndarray[Any, np.dtype[np.int64]]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Each UTC instant's (microseconds since the epoch) month as ``year * 12 + month - 1``."""
    # numpy's month arithmetic on the UTC instants; pyarrow's pc.month converts each value through the zone
    months = micros.astype("datetime64[us]").astype("datetime64[M]")
    return months.astype(np.int64) + 1970 * 12


def _month(code: int) -> dt.date:
    return dt.date(code // 12, code % 12 + 1, 1)


def _code(month: dt.date) -> int:
    return month.year * 12 + month.month - 1


__all__ = [
    "ATTACHING",
    "DELETING",
    "PARTITIONED",
    "READING",
    "MonthFill",
    "attach_and_copy",
    "attach_filled",
    "create_filled",
    "existing_months",
    "fill_new_months",
    "is_partitioned",
    "lock_creators",
    "lock_default",
    "lock_new_months",
    "month_bounds",
    "months_of",
    "months_of_range",
    "partition_name",
]
