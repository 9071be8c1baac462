"""The target database: its tables, and the ``refresher_segments`` ledger of what has been loaded.

Segment ranges (one rule, used by the loader, the pruner and ``--verify``):

* a daily segment holds the rows whose ``date`` (the session date) lies in the calendar month;
* a minute segment holds the rows whose ``ts``, read in the exchange's time zone, lies in the calendar month,
  i.e. ``[local midnight of the 1st, local midnight of the next 1st)`` converted to UTC. For exchanges whose
  sessions do not cross local midnight (XNYS, XLON, ...) this is exactly "the session date lies in the month";
  sources must cut overnight sessions by the same local-date rule so that loader and source agree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg import sql

from refresher import partitions
from refresher.errors import LoadError
from refresher.ledger_counter import ensure_ledger_counter, schema_locked
from refresher.schema import SCHEMA_OF
from refresher.segments import TABLE_OF, Segment

SEGMENTS_TABLE = "refresher_segments"

# Column order matches refresher.schema (binary COPY maps columns by position).
DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS symbols (
        symbol text PRIMARY KEY,
        exchange text,
        asset_class text
    )""",
    """CREATE TABLE IF NOT EXISTS ohlcv_daily (
        symbol text NOT NULL,
        date date NOT NULL,
        open float8 NOT NULL,
        high float8 NOT NULL,
        low float8 NOT NULL,
        close float8 NOT NULL,
        volume int8 NOT NULL,
        CONSTRAINT ohlcv_daily_pkey PRIMARY KEY (symbol, date)
    )""",
    """CREATE TABLE IF NOT EXISTS ohlcv_1min (
        symbol text NOT NULL,
        ts timestamptz NOT NULL,
        open float8 NOT NULL,
        high float8 NOT NULL,
        low float8 NOT NULL,
        close float8 NOT NULL,
        volume int8 NOT NULL,
        CONSTRAINT ohlcv_1min_pkey PRIMARY KEY (symbol, ts)
    ) PARTITION BY RANGE (ts)""",
    """CREATE TABLE IF NOT EXISTS refresher_segments (
        symbol text NOT NULL,
        timeframe text NOT NULL,
        month date NOT NULL,
        content_hash text NOT NULL,
        rows bigint NOT NULL,
        loaded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (symbol, timeframe, month)
    )""",
    # Rows a source quarantined (``on_bad_rows: quarantine``), replaced with their segment on every load.
    """CREATE TABLE IF NOT EXISTS refresher_rejects (
        symbol text NOT NULL,
        timeframe text NOT NULL,
        month date NOT NULL,
        source text NOT NULL,
        row bigint,
        rule text NOT NULL,
        "column" text NOT NULL,
        raw jsonb NOT NULL,
        rejected_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS refresher_rejects_segment ON refresher_rejects (symbol, timeframe, month)",
)

# Month partitions are made by the loader (refresher.partitions); the default one takes the rest. A database
# made before partitions keeps its plain ohlcv_1min, and gets no default partition. Not in DDL: not a table of
# its own to the stamp (refresher.stamp.TABLES), which checks the tables DDL creates.
DEFAULT_PARTITION = """DO $$ BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'ohlcv_1min'::regclass) = 'p' THEN
        CREATE TABLE IF NOT EXISTS ohlcv_1min_default PARTITION OF ohlcv_1min DEFAULT;
    END IF;
END $$"""

# The column that places a row in its segment, per table.
TIME_COLUMN: dict[str, str] = {"ohlcv_daily": "date", "ohlcv_1min": "ts"}


@dataclass(frozen=True)
class LoadedSegment:
    """One row of ``refresher_segments``: what the database holds for a segment."""

    content_hash: str
    rows: int
    loaded_at: dt.datetime


TzArg = str | Mapping[str, str] | None


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the tables when missing; idempotent, and safe for two loaders racing on a fresh database."""
    # CREATE TABLE IF NOT EXISTS is not race-free across sessions; the lock makes it so.
    with schema_locked(conn):
        for statement in (*DDL, DEFAULT_PARTITION):
            conn.execute(statement)  # constant DDL, no user input
        ensure_ledger_counter(conn, SEGMENTS_TABLE)


def data_columns(segment: Segment) -> list[str]:
    return list(SCHEMA_OF[segment.timeframe].names)


def segment_range(segment: Segment, tz: str) -> tuple[dt.date | dt.datetime, dt.date | dt.datetime]:
    """The half-open range of the segment's time column (see the module docstring for the rule)."""
    start, end = segment.month_bounds()
    if segment.timeframe == "1d":
        return start, end
    zone = zone_of(tz)
    return (
        dt.datetime.combine(start, dt.time(), zone).astimezone(dt.UTC),
        dt.datetime.combine(end, dt.time(), zone).astimezone(dt.UTC),
    )


def zone_of(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise LoadError(f"tz={tz!r}: unknown time zone", field="tz", value=tz) from exc


def schema_exists(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``ensure_schema`` ever ran here (the ledger table exists); never creates anything."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (SEGMENTS_TABLE,)).fetchone()
    return bool(row and row[0])


def read_loaded_segments(conn: psycopg.Connection[Any]) -> dict[Segment, LoadedSegment]:
    """Everything ``refresher_segments`` says is loaded; empty when the schema does not exist yet."""
    if not schema_exists(conn):
        return {}
    rows = conn.execute(
        "SELECT symbol, timeframe, month, content_hash, rows, loaded_at FROM refresher_segments"
    ).fetchall()
    loaded: dict[Segment, LoadedSegment] = {}
    for symbol, timeframe, month, content_hash, n, loaded_at in rows:
        if timeframe in TABLE_OF:  # a ledger row from a future version with another timeframe is not ours
            loaded[Segment(symbol, timeframe, month)] = LoadedSegment(content_hash, n, loaded_at)
    return loaded


def read_ledger_rows(conn: psycopg.Connection[Any]) -> dict[tuple[str, str, dt.date], tuple[str, int]]:
    """``refresher_segments`` as (symbol, timeframe, month) -> (content_hash, rows), in one query and without an
    object per row (the plan compares 60,000 of them in bulk); empty when the schema does not exist yet."""
    if not schema_exists(conn):
        return {}
    rows = conn.execute(
        "SELECT symbol, timeframe, month, content_hash, rows FROM refresher_segments WHERE timeframe = ANY(%s)",
        (list(TABLE_OF),),  # a ledger row from a future version with another timeframe is not ours
    ).fetchall()
    return {
        (symbol, timeframe, month): (content_hash, n) for symbol, timeframe, month, content_hash, n in rows
    }


def count_rows(
    conn: psycopg.Connection[Any], segments: Iterable[Segment], *, timezones: TzArg = None, wait: float
) -> dict[Segment, int]:
    """Actual rows per segment in the data tables, for ``--verify``: one query per table, index range counts.

    ``timezones`` bounds minute segments: one zone for all symbols, or a symbol -> zone map. A symbol missing
    from the map (a stale segment of a symbol the profile dropped) is counted by the UTC month: at worst its
    count is off at the month's edges and verify reloads a segment that is about to be pruned anyway.

    A partitioned table's count reads through the parent, whose plan locks the default partition: beside a
    loader stopped (SIGSTOP, a hung client) after its ATTACH, which holds the default exclusively until it
    commits, the count waited for as long as it stayed stopped. The default is locked first, in the count's
    transaction, as a load locks it (``partitions.lock_default``, ``wait`` seconds): a holder stalled in a COPY
    that read nothing all the wait is ended, a live one waited for, one idle in its transaction the whole wait
    is a LoadError naming its pid. The lock taken before the count's plan also lets it see a month such a
    creator attached while it waited: planned before that commit, it missed the new partition's rows (a live
    creator's 2,000 counted as 0, and verify reloaded a segment that was whole).
    """
    by_table: dict[str, list[Segment]] = {}
    for segment in segments:
        by_table.setdefault(segment.table, []).append(segment)
    counts: dict[Segment, int] = {}
    for table, group in by_table.items():
        bounds = [segment_range(s, _tz_for(s, timezones)) for s in group]
        column = sql.Identifier(TIME_COLUMN[table])
        element = "date" if table == "ohlcv_daily" else "timestamptz"
        # A correlated count per (symbol, range) row uses the primary key's range scan: cost follows the
        # segments asked about, not the table size.
        query = sql.SQL(
            "SELECT s.i, (SELECT count(*) FROM {table} d WHERE d.symbol = s.symbol AND d.{col} >= s.lo "
            "AND d.{col} < s.hi) FROM unnest(%s::int[], %s::text[], %s::{el}[], %s::{el}[]) "
            "AS s(i, symbol, lo, hi)"
        ).format(table=sql.Identifier(table), col=column, el=sql.SQL(element))
        params = (
            list(range(len(group))),
            [s.symbol for s in group],
            [b[0] for b in bounds],
            [b[1] for b in bounds],
        )
        with conn.transaction():
            partitions.lock_default(conn, table, mode=partitions.READING, wait=wait)
            for i, n in conn.execute(query, params).fetchall():
                counts[group[i]] = n
    return counts


def _tz_for(segment: Segment, tz: TzArg) -> str:
    if segment.timeframe == "1d":
        return "UTC"  # unused: daily ranges are dates
    if isinstance(tz, str):
        return tz
    if tz is not None:
        return tz.get(segment.symbol, "UTC")
    raise LoadError(
        f"{segment}: minute segments need the exchange time zone (timezones=)", segment=str(segment)
    )


class SymbolRow(Protocol):
    """Anything with a symbol, its exchange and asset class (``refresher.profile.Listing`` is one)."""

    @property
    def symbol(self) -> str: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def asset_class(self) -> str | None: ...


def upsert_symbols(
    conn: psycopg.Connection[Any], rows: Iterable[SymbolRow | tuple[str, str | None, str | None]]
) -> int:
    """Insert or update symbols, given as listings or ``(symbol, exchange, asset_class)``; returns how many."""
    data = [r if isinstance(r, tuple) else (r.symbol, r.exchange, r.asset_class) for r in rows]
    if not data:
        return 0
    latest = list({row[0]: row for row in data}.values())  # one row per symbol, the last given, as before
    # One statement, and rows that did not change are not rewritten: every refresh upserts the profile's
    # symbols (1,000 rows in 40 ms, each a new row version, through executemany).
    conn.execute(
        "INSERT INTO symbols (symbol, exchange, asset_class) "
        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]) "
        "ON CONFLICT (symbol) DO UPDATE SET exchange = EXCLUDED.exchange, asset_class = EXCLUDED.asset_class "
        "WHERE (symbols.exchange, symbols.asset_class) IS DISTINCT FROM (EXCLUDED.exchange, EXCLUDED.asset_class)",
        ([row[0] for row in latest], [row[1] for row in latest], [row[2] for row in latest]),
    )
    return len(data)


__all__ = [
    "DDL",
    "SEGMENTS_TABLE",
    "LoadedSegment",
    "SymbolRow",
    "count_rows",
    "data_columns",
    "ensure_schema",
    "read_ledger_rows",
    "read_loaded_segments",
    "schema_exists",
    "segment_range",
    "upsert_symbols",
]
