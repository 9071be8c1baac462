"""Arrow -> PostgreSQL by binary COPY, one transaction per segment.

Each segment's delete, COPY and ``refresher_segments`` row commit together, so a crash, a failed COPY or a
Ctrl-C leaves either the old segment or the new one, never half of either: the ledger can be trusted by the
next plan. Binary COPY through pgpq beats CSV COPY (numbers in bench/bench_load.py).

There is no "drop the primary key, load, re-add it" fast path for cold loads: measured on 2 M minute bars
(50 segments) it was slower (0.39 M rows/s vs 0.55 M rows/s), because rows arrive in key order and the
B-tree grows at its right edge, while the rebuild sorts everything again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

from refresher.database import TIME_COLUMN, data_columns, segment_range
from refresher.diskfull import COPY_SLACK, require_room, server_disk_full
from refresher.errors import LoadError
from refresher.schema import SCHEMA_OF
from refresher.segments import Segment

if TYPE_CHECKING:
    from refresher.sources.validate import Reject

# Rows per COPY message batch: big enough to amortise the per-call cost, small enough to keep memory flat.
BATCH_ROWS = 128 * 1024


class ShrinkError(LoadError):
    """Segments that hold rows would be replaced by empty ones (a header-only file, a symbol gone upstream)."""

    emptied: list[tuple[Segment, int]]

    @classmethod
    def refused(cls, emptied: Sequence[tuple[Segment, int]]) -> ShrinkError:
        by_symbol: dict[tuple[str, str], list[str]] = {}
        for segment, _ in emptied:
            by_symbol.setdefault((segment.symbol, segment.timeframe), []).append(f"{segment.month:%Y-%m}")
        named = "; ".join(
            f"{sym} {tf} {', '.join(months)}" for (sym, tf), months in sorted(by_symbol.items())
        )
        lost = sum(rows for _, rows in emptied)
        error = cls(
            f"refusing to empty {len(emptied)} loaded segment{'s' * (len(emptied) != 1)} ({lost} rows) that "
            f"the source now returns no rows for: {named}; pass --allow-shrink (or source.allow_shrink: true) "
            "to accept",
            segments=[str(s) for s, _ in emptied],
        )
        error.emptied = list(emptied)
        return error


def load_segment(
    conn: psycopg.Connection[Any],
    segment: Segment,
    table: pa.Table,
    content_hash: str,
    *,
    tz: str,
    allow_shrink: bool = True,
    rejects: Sequence[Reject] | None = None,
) -> int:
    """Replace the segment's rows with ``table`` and record it in ``refresher_segments``; returns the row count.

    Runs in one transaction (a savepoint if the caller already has one open). ``tz`` is the exchange's time
    zone, which bounds a minute segment (see ``refresher.database``). Without ``allow_shrink``, an empty
    ``table`` for a segment the ledger says holds rows raises ``ShrinkError`` and changes nothing. ``rejects``
    (when given) replace the segment's rows in ``refresher_rejects``, in the same transaction.
    """
    data = conform(segment, table, tz)
    rows: int = data.num_rows
    lo, hi = segment_range(segment, tz)
    # Rows, their primary-key index and the WAL: measured about three times the Arrow size. Checked first
    # because a full disk under the WAL makes the server PANIC instead of failing the statement.
    needed = 3 * data.nbytes
    require_room(conn, needed=needed + COPY_SLACK, what=f"loading {segment}")
    try:
        with conn.transaction():
            if rows == 0 and not allow_shrink:
                held = _ledger_rows(conn, segment)
                if held:
                    raise ShrinkError.refused([(segment, held)])
            _delete_rows(conn, segment, lo, hi)
            copy_arrow(conn, segment.table, data_columns(segment), data)
            _record(conn, segment, content_hash, rows)
            if rejects is not None:
                _quarantine(conn, segment, rejects)
    except psycopg.errors.DiskFull as exc:
        raise server_disk_full(conn, exc, needed=needed, what=f"loading {segment}") from exc
    except psycopg.Error as exc:
        raise LoadError(f"{segment}: loading failed: {exc}".rstrip(), segment=str(segment)) from exc
    return rows


def delete_segment(conn: psycopg.Connection[Any], segment: Segment, *, tz: str) -> int:
    """Remove a segment's rows and its ledger row together (``refresh --prune``); returns rows deleted."""
    lo, hi = segment_range(segment, tz)
    with conn.transaction():
        deleted = _delete_rows(conn, segment, lo, hi)
        conn.execute(
            "DELETE FROM refresher_segments WHERE symbol = %s AND timeframe = %s AND month = %s",
            (segment.symbol, segment.timeframe, segment.month),
        )
        _quarantine(conn, segment, ())
    return deleted


def conform(segment: Segment, table: pa.Table, tz: str) -> pa.Table:
    """The table in the segment's schema and column order, checked to hold only the segment's rows."""
    schema = SCHEMA_OF[segment.timeframe]
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise LoadError(f"{segment}: table lacks column(s) {', '.join(missing)}", segment=str(segment))
    try:
        data = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise LoadError(
            f"{segment}: columns do not fit {segment.table}: {exc}", segment=str(segment)
        ) from exc
    if data.num_rows == 0:
        return data
    for name in schema.names:
        if data.column(name).null_count:
            raise LoadError(f"{segment}: column {name} has nulls", segment=str(segment), field=name)
    if not pc.all(pc.equal(data.column("symbol"), segment.symbol)).as_py():
        raise LoadError(f"{segment}: rows of other symbols in the table", segment=str(segment))
    lo, hi = segment_range(segment, tz)
    bounds = pc.min_max(data.column(TIME_COLUMN[segment.table]))
    first, last = bounds["min"].as_py(), bounds["max"].as_py()
    if not (_as_comparable(lo) <= _as_comparable(first) and _as_comparable(last) < _as_comparable(hi)):
        raise LoadError(
            f"{segment}: rows from {first} to {last} fall outside the segment [{lo}, {hi})",
            segment=str(segment),
        )
    return data


def _as_comparable(value: dt.date | dt.datetime) -> dt.date | dt.datetime:
    return value.astimezone(dt.UTC) if isinstance(value, dt.datetime) else value


def _delete_rows(
    conn: psycopg.Connection[Any], segment: Segment, lo: dt.date | dt.datetime, hi: dt.date | dt.datetime
) -> int:
    query = sql.SQL("DELETE FROM {} WHERE symbol = %s AND {col} >= %s AND {col} < %s").format(
        sql.Identifier(segment.table), col=sql.Identifier(TIME_COLUMN[segment.table])
    )
    return int(conn.execute(query, (segment.symbol, lo, hi)).rowcount)


def copy_arrow(conn: psycopg.Connection[Any], table: str, columns: Sequence[str], data: pa.Table) -> None:
    """Binary COPY of ``data`` into ``columns`` of ``table``, inside the caller's transaction."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    encoder = ArrowToPostgresBinaryEncoder(data.schema)
    # An exception here (Ctrl-C included) makes psycopg send CopyFail, and the transaction rolls back.
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.write(encoder.write_header())
        for batch in data.to_batches(max_chunksize=BATCH_ROWS):
            copy.write(encoder.write_batch(batch))
        copy.write(encoder.finish())


def _ledger_rows(conn: psycopg.Connection[Any], segment: Segment) -> int:
    row = conn.execute(
        "SELECT rows FROM refresher_segments WHERE symbol = %s AND timeframe = %s AND month = %s",
        (segment.symbol, segment.timeframe, segment.month),
    ).fetchone()
    return int(row[0]) if row else 0


def _quarantine(conn: psycopg.Connection[Any], segment: Segment, rejects: Sequence[Reject]) -> None:
    key = (segment.symbol, segment.timeframe, segment.month)
    conn.execute("DELETE FROM refresher_rejects WHERE symbol = %s AND timeframe = %s AND month = %s", key)
    if rejects:
        with conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO refresher_rejects (symbol, timeframe, month, source, row, rule, "column", raw) '
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
                [(*key, r.source, r.row, r.rule, r.column, r.raw) for r in rejects],
            )


def _record(conn: psycopg.Connection[Any], segment: Segment, content_hash: str, rows: int) -> None:
    conn.execute(
        "INSERT INTO refresher_segments (symbol, timeframe, month, content_hash, rows, loaded_at) "
        "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (symbol, timeframe, month) DO UPDATE SET "
        "content_hash = EXCLUDED.content_hash, rows = EXCLUDED.rows, loaded_at = EXCLUDED.loaded_at",
        (segment.symbol, segment.timeframe, segment.month, content_hash, rows),
    )


__all__ = ["BATCH_ROWS", "ShrinkError", "conform", "copy_arrow", "delete_segment", "load_segment"]
