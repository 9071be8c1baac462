"""Arrow -> PostgreSQL by binary COPY, one transaction per batch of segments.

A batch's deletes, its COPY and its ``refresher_segments`` rows commit together, so a crash, a failed COPY or a
Ctrl-C leaves each segment of the batch either as it was or as it is now, never half of either: the ledger can
be trusted by the next plan. One segment is a batch of one (``load_segment``). Batches exist because a month of
daily bars is about 21 rows: one transaction, one DELETE, one COPY and one ledger statement per segment cost
about 5 ms (measured), a hundred times the rows' own cost; per batch they are paid once.

A segment whose loaded content (by the ledger) is a prefix of its new content gets only the new rows appended
(``SegmentLoad.may_append``): a daily refresh adds one session to the month. The prefix is checked by hashing the
new table's first ``rows`` rows the way the store hashed the old content, in the same transaction that reads the
ledger row and writes the new one, so an append is exactly a full reload or is not done.

Binary COPY through pgpq beats CSV COPY (numbers in bench/bench_load.py). There is no "drop the primary key,
load, re-add it" fast path for a table that already holds rows: measured on 2 M minute bars (50 segments) it was
slower (0.39 M rows/s vs 0.55 M rows/s), because rows arrive in key order and the B-tree grows at its right edge,
while the rebuild sorts everything again. A new month partition does get its key after its rows
(``refresher.partitions``): there the build covers only the rows just copied, in the same unlogged transaction.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

from featurestore.fingerprint import fingerprint_table
from refresher import bodies, partitions
from refresher.database import TIME_COLUMN, segment_range
from refresher.diskfull import COPY_SLACK, require_room, server_disk_full
from refresher.errors import LoadError
from refresher.fence import SEGMENTS_HELD, Fence, advisory_locked, held_by
from refresher.schema import SCHEMA_OF
from refresher.segments import TABLE_OF, Segment

if TYPE_CHECKING:
    from refresher.sources.validate import Reject

# Rows per COPY message batch: big enough to amortise the per-call cost, small enough to keep memory flat.
BATCH_ROWS = 128 * 1024
# Chunks of fewer rows than this on average are combined before a COPY (minute segments, ~8,000 rows, are not).
_SMALL_CHUNK_ROWS = 1024
# The array type of each table's time column, for the statements that take one bound per segment.
_TIME_ARRAY = {"ohlcv_daily": "date[]", "ohlcv_1min": "timestamptz[]"}
# Seconds a load waits for another's load of one of its segments (another refresh or worker loading it, a job
# delivered twice, a loader stopped inside it) before ending that one's stalled COPY, or failing as a lock timeout.
SEGMENT_LOCK_WAIT = 10.0


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


@dataclass(frozen=True)
class SegmentLoad:
    """One segment's new content, for ``load_segments``."""

    segment: Segment
    # Its rows, or a minute segment's COPY body from the store (``refresher.bodies``), sent as it is when the
    # batch fills a new month and read as a table otherwise.
    table: pa.Table | bodies.StoredBody
    content_hash: str
    # The exchange's time zone, which bounds a minute segment (see ``refresher.database``).
    tz: str
    # Replace the segment's rows in ``refresher_rejects`` with these; None leaves them as they are.
    rejects: Sequence[Reject] | None = None
    # Append only the new rows when the loaded content is a prefix of ``table``. False when the ledger is
    # known not to describe the rows (``--verify`` found other counts): then only a full reload is exact.
    may_append: bool = True


@dataclass(frozen=True)
class BatchOutcome:
    """What ``load_segments`` wrote: rows copied per segment (0 for one left as it was), which segments were
    appended to rather than reloaded, and those refused because they would have been emptied."""

    rows: tuple[int, ...]
    appended: frozenset[Segment]
    emptied: tuple[tuple[Segment, int], ...]


def load_segments(
    conn: psycopg.Connection[Any],
    items: Sequence[SegmentLoad],
    *,
    allow_shrink: bool = True,
) -> BatchOutcome:
    """Replace each segment's rows with its table and record it in ``refresher_segments``, all in one
    transaction (a savepoint if the caller already has one open).

    Without ``allow_shrink``, a segment whose table is empty while the ledger says it holds rows is left as it
    is and returned in ``emptied``; the rest of the batch loads.

    A minute segment given as its stored COPY body (``refresher.bodies``) is sent as it is when the batch fills
    a new month whole; a load never makes a body to keep (the detached refill does, ``bodies.make_bodies``).
    """
    if not items:
        return BatchOutcome((), frozenset(), ())
    datas = _conformed(items)
    named = _named([item.segment for item in items])
    what = f"loading {named}"
    # Rows, their primary-key index and the WAL: measured about three times the Arrow size. Checked first
    # because a full disk under the WAL makes the server PANIC instead of failing the statement.
    needed = 3 * sum(data.num_rows for data in datas) * ROW_BYTES
    try:
        with conn.transaction():
            require_room(conn, needed=needed + COPY_SLACK, what=what)
            return _write_batch(conn, items, datas, allow_shrink=allow_shrink)
    except psycopg.errors.DiskFull as exc:
        raise server_disk_full(conn, exc, needed=needed, what=what) from exc
    except psycopg.Error as exc:
        raise LoadError(
            f"{named}: loading failed: {server_said(exc)}".rstrip(), segment=str(items[0].segment)
        ) from exc


def _named(segments: Sequence[Segment]) -> str:
    """A batch in an error: its first segment, and how many more."""
    return f"{segments[0]}" + (f" (and {len(segments) - 1} more in its batch)" if len(segments) > 1 else "")


def server_said(exc: psycopg.Error) -> str:
    """The server's error in one line, as every error the CLI prints: its DETAIL (which row) on the same line."""
    return "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())


def load_segment(
    conn: psycopg.Connection[Any],
    segment: Segment,
    table: pa.Table,
    content_hash: str,
    *,
    tz: str,
    allow_shrink: bool = True,
    rejects: Sequence[Reject] | None = None,
    may_append: bool = True,
) -> int:
    """``load_segments`` of one segment; returns the rows copied. Without ``allow_shrink``, an empty ``table``
    for a segment the ledger says holds rows raises ``ShrinkError`` and changes nothing."""
    item = SegmentLoad(segment, table, content_hash, tz, rejects, may_append)
    outcome = load_segments(conn, [item], allow_shrink=allow_shrink)
    if outcome.emptied:
        raise ShrinkError.refused(outcome.emptied)
    return outcome.rows[0]


def _write_batch(
    conn: psycopg.Connection[Any],
    items: Sequence[SegmentLoad],
    loaded: Sequence[pa.Table | bodies.StoredBody],
    *,
    allow_shrink: bool,
) -> BatchOutcome:
    lock_segments(conn, [item.segment for item in items])
    ledger = _ledger_of(conn, [item.segment for item in items])
    month = _bodies_month(items, loaded, ledger)
    if month is not None and partitions.lock_new_months(conn, bodies.TABLE, {month}, wait=SEGMENT_LOCK_WAIT):
        return _fill_by_bodies(conn, items, loaded, month)
    datas = [_as_table(item, data) for item, data in zip(items, loaded, strict=True)]
    emptied: list[tuple[Segment, int]] = []
    appended: set[Segment] = set()
    rows: list[int] = []
    reload: list[SegmentLoad] = []
    copies: dict[str, list[pa.Table]] = {}
    written: list[tuple[SegmentLoad, int]] = []
    for item, data in zip(items, datas, strict=True):
        held = ledger.get(item.segment)
        if data.num_rows == 0 and held and held[1] and not allow_shrink:
            emptied.append((item.segment, held[1]))
            rows.append(0)
            continue
        start = _appendable_from(item, data, held)
        if start:
            appended.add(item.segment)
        else:
            reload.append(item)
        copies.setdefault(item.segment.table, []).append(data.slice(start))
        rows.append(data.num_rows - start)
        written.append((item, data.num_rows))
    rows_of = {table: pa.concat_tables(parts) for table, parts in sorted(copies.items())}
    # The lock order (``refresher.partitions``): segments, then new months, then, having filled the new months'
    # partitions, the creators' lock and the default partition's before the first statement on a parent (the
    # DELETE may touch the default partition, which a creator's ATTACH takes exclusively).
    months = {
        table: partitions.lock_new_months(conn, table, data, wait=SEGMENT_LOCK_WAIT)
        for table, data in rows_of.items()
    }
    fills = [
        partitions.fill_new_months(conn, table, data.schema.names, data, copy_arrow, months[table])
        for table, data in rows_of.items()
    ]
    if any(months.values()):
        partitions.lock_creators(conn, wait=SEGMENT_LOCK_WAIT)
    deleted = {item.segment.table for item in reload}
    for table in rows_of:
        if months[table] or table in deleted:
            mode = partitions.ATTACHING if months[table] else partitions.DELETING
            partitions.lock_default(conn, table, mode=mode, wait=SEGMENT_LOCK_WAIT)
    _delete_rows(conn, reload)
    for fill in fills:
        partitions.attach_and_copy(conn, fill, copy_arrow)
    _record(conn, written)
    _quarantine(conn, [(item.segment, item.rejects) for item, _ in written if item.rejects is not None])
    return BatchOutcome(tuple(rows), frozenset(appended), tuple(emptied))


def lock_segments(
    conn: psycopg.Connection[Any], segments: Sequence[Segment], *, patient: bool = True
) -> None:
    """Take the segments' advisory locks until the transaction ends.

    Two loads of one segment at once (two workers, a refresh beside a worker, a library caller beside a refresh)
    take turns: the second reads the ledger after the first commits, so it appends to or replaces what is really
    there. In id order, so two overlapping batches cannot deadlock.

    Bounded (``refresher.fence.advisory_locked``): a loader stopped inside its load (SIGSTOP, a suspended machine,
    in its COPY) held its locks for as long as it stayed stopped, and a refresh loading one of its segments
    waited as long, for ever. The wait is ``SEGMENT_LOCK_WAIT``; past it a session that held one inside a COPY
    that read nothing all along is ended and the locks taken again. A load running past it is waited for
    (``patient``) or, not, a LoadError naming the sessions, as is a holder idle inside its transaction the whole
    wait (a loader stopped between two statements); its cause a lock timeout: transient, a worker retries it."""
    ids = sorted({segment_lock_id(segment) for segment in segments})
    try:
        advisory_locked(
            conn,
            SEGMENT_LOCK_WAIT,
            "id",
            "unnest(%s::bigint[]) AS id",
            (ids,),
            SEGMENTS_HELD,
            (ids,),
            patient=patient,
        )
    except psycopg.errors.LockNotAvailable as exc:
        raise LoadError(
            f"{_named(segments)}: another load of these segments held their lock for over {SEGMENT_LOCK_WAIT:g} s "
            f"({held_by(conn, SEGMENTS_HELD, (ids,))}); try again once it is done",
            segment=str(segments[0]),
        ) from exc


def segment_lock_id(segment: Segment) -> int:
    """A stable 63-bit advisory lock id for a segment (crc32 of each part; collisions only serialise)."""
    value = 0
    for part in (segment.symbol, segment.timeframe, str(segment.month)):
        value = (value << 21) ^ zlib.crc32(part.encode())
    return value & 0x7FFF_FFFF_FFFF_FFFF


def _appendable_from(item: SegmentLoad, data: pa.Table, held: tuple[str, int] | None) -> int:
    """How many leading rows of ``data`` the database already holds (0: reload the segment whole).

    Only an xxh3 ledger hash is trusted for this (the footer method does not cover every row), and only a
    strictly longer table: equal content never reaches the loader, and a shorter one is not an append.
    """
    if not item.may_append or held is None:
        return 0
    content_hash, loaded = held
    if not (0 < loaded < data.num_rows) or not content_hash.startswith("xxh3:"):
        return 0
    return loaded if fingerprint_table(data.slice(0, loaded)) == content_hash else 0


def delete_segment(
    conn: psycopg.Connection[Any], segment: Segment, *, tz: str, fence: Fence | None = None
) -> int:
    """Remove a segment's rows and its ledger row together (``refresh --prune``); returns rows deleted. With
    ``fence`` (a queue run's features stage), only while the fence is still this writer's."""
    lo, hi = segment_range(segment, tz)
    query = sql.SQL("DELETE FROM {} WHERE symbol = %s AND {col} >= %s AND {col} < %s").format(
        sql.Identifier(segment.table), col=sql.Identifier(TIME_COLUMN[segment.table])
    )
    with conn.transaction():
        if fence is not None:
            fence.check(conn)
        partitions.lock_default(conn, segment.table, mode=partitions.DELETING, wait=SEGMENT_LOCK_WAIT)
        deleted = int(conn.execute(query, (segment.symbol, lo, hi)).rowcount)
        conn.execute(
            "DELETE FROM refresher_segments WHERE symbol = %s AND timeframe = %s AND month = %s",
            (segment.symbol, segment.timeframe, segment.month),
        )
        _quarantine(conn, [(segment, ())])
    return deleted


def _conformed(items: Sequence[SegmentLoad]) -> list[pa.Table | bodies.StoredBody]:
    """``conform_many`` of the items' tables; a stored COPY body kept as it is when what the store knows of its
    rows (``_body_fits``) passes the same checks, else read as its table and checked as any."""
    tables = [i for i, item in enumerate(items) if not _body_fits(item)]
    out: list[pa.Table | bodies.StoredBody] = [item.table for item in items]
    if tables:
        read = [replace(items[i], table=_read(items[i])) for i in tables]
        for i, data in zip(tables, conform_many(read), strict=True):
            out[i] = data
    return out


def _body_fits(item: SegmentLoad) -> bool:
    """Whether a stored body passes ``_check_rows`` by its manifest row: made of the segment's content, of its
    symbol alone, at least one row, its first and last instant inside the segment. The body was made of rows
    that passed those checks row by row; its content hash is the one the ledger will record."""
    data = item.table
    if not isinstance(data, bodies.StoredBody):
        return False
    entry, segment = data.entry, item.segment
    if (
        segment.table != bodies.TABLE
        or entry.content_hash != item.content_hash
        or entry.symbol != segment.symbol
    ):
        return False
    if entry.start_ts is None or entry.end_ts is None or entry.rows <= 0:
        return False
    lo, hi = segment_range(segment, item.tz)
    return bool(lo <= entry.start_ts and entry.end_ts < hi)


def _as_table(item: SegmentLoad, data: pa.Table | bodies.StoredBody) -> pa.Table:
    """An item's conformed rows (``_conformed``) as a table: a stored body's read and checked as any table."""
    return data if isinstance(data, pa.Table) else conform_many([replace(item, table=_read(item))])[0]


def _read(item: SegmentLoad) -> pa.Table:
    """An item's table: a stored body's read from the store (its Parquet file, verified)."""
    if isinstance(item.table, pa.Table):
        return item.table
    table = item.table.read_table()
    if table is None:
        raise LoadError(
            f"{item.segment}: its stored table went from the store during the load; refresh again",
            segment=str(item.segment),
        )
    return table


def conform(segment: Segment, table: pa.Table, tz: str) -> pa.Table:
    """The table in the segment's schema and column order, checked to hold only the segment's rows."""
    return conform_many([SegmentLoad(segment, table, "", tz)])[0]


def _field_bytes(field: pa.Field) -> int:
    try:
        return max(1, int(field.type.bit_width) // 8)
    except ValueError:  # variable width: a symbol, generously
        return 24


# Arrow bytes per row of the widest segment schema. An estimate from the schema, because ``Table.nbytes``
# walks every buffer of every slice: 85 us a segment, a second of a 12,000-segment load.
ROW_BYTES = max(sum(_field_bytes(f) for f in schema) for schema in SCHEMA_OF.values())


def conform_many(items: Sequence[SegmentLoad]) -> list[pa.Table]:
    """Each item's table in its segment's schema and column order, checked to hold only its segment's rows.

    The checks run once over each timeframe's rows of the whole batch (a per-segment check costs more than
    the 21 rows of a daily segment); an error still names the first segment at fault.
    """
    datas = [_cast(item) for item in items]
    for timeframe in TABLE_OF:
        picked = [
            i for i, item in enumerate(items) if item.segment.timeframe == timeframe and datas[i].num_rows
        ]
        if picked:
            _check_rows([items[i] for i in picked], [datas[i] for i in picked])
    return datas


def _cast(item: SegmentLoad) -> pa.Table:
    segment, table = item.segment, item.table
    assert isinstance(table, pa.Table)  # ``_conformed`` reads a stored body's table first
    schema = SCHEMA_OF[segment.timeframe]
    if table.schema.equals(schema):
        return table
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise LoadError(f"{segment}: table lacks column(s) {', '.join(missing)}", segment=str(segment))
    picked = table.select(schema.names)
    for name in schema.names:  # before the cast, which refuses nulls in a non-nullable field less clearly
        if picked.column(name).null_count:
            raise LoadError(f"{segment}: column {name} has nulls", segment=str(segment), field=name)
    try:
        return picked.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise LoadError(
            f"{segment}: columns do not fit {segment.table}: {exc}", segment=str(segment)
        ) from exc


def _check_rows(items: Sequence[SegmentLoad], datas: Sequence[pa.Table]) -> None:
    """No nulls, only the segment's symbol, only times inside the segment: for every row of the batch.

    Per segment, not per row, wherever that is enough: a segment holds only its symbol when its first row does
    and the symbol changes nowhere inside it, and only its times when its least and greatest do. Columns of
    each row's expected symbol and bounds cost 0.19-0.55 s of CPU for backtesting's 12 months of minute bars,
    these checks 0.06 s. The error names the first segment at fault, as a row-by-row check would."""
    counts = np.array([data.num_rows for data in datas])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rows = pa.concat_tables(datas)
    for name in rows.column_names:
        column = rows.column(name)
        if column.null_count:
            segment = items[_owner(starts, pc.index(pc.is_null(column), True).as_py())].segment
            raise LoadError(f"{segment}: column {name} has nulls", segment=str(segment), field=name)
    symbol = rows.column("symbol")
    heads = symbol.take(pa.array(starts))
    bad_symbol = pc.not_equal(heads, pa.array([item.segment.symbol for item in items])).to_numpy(
        zero_copy_only=False
    )
    if len(symbol) > 1:
        after = symbol.slice(1)
        changes = pc.not_equal(after, symbol.slice(0, len(after))).to_numpy(zero_copy_only=False)
        inside = np.flatnonzero(changes) + 1  # rows whose symbol differs from the row before
        inside = inside[~np.isin(inside, starts)]  # where a segment starts, the symbol may change
        if len(inside):
            bad_symbol[_owner(starts, int(inside[0]))] = True
    if bad_symbol.any():
        segment = items[int(np.argmax(bad_symbol))].segment
        raise LoadError(f"{segment}: rows of other symbols in the table", segment=str(segment))
    column = rows.column(TIME_COLUMN[items[0].segment.table])
    bounds = [segment_range(item.segment, item.tz) for item in items]
    lo = _as_numbers(pa.array([b[0] for b in bounds], column.type))
    hi = _as_numbers(pa.array([b[1] for b in bounds], column.type))
    when = _as_numbers(column)
    outside = (np.minimum.reduceat(when, starts) < lo) | (np.maximum.reduceat(when, starts) >= hi)
    if outside.any():
        index = int(np.argmax(outside))
        segment, (start, end) = items[index].segment, bounds[index]
        extent = pc.min_max(datas[index].column(TIME_COLUMN[segment.table]))
        raise LoadError(
            f"{segment}: rows from {extent['min'].as_py()} to {extent['max'].as_py()} fall outside the "
            f"segment [{start}, {end})",
            segment=str(segment),
        )


def _owner(starts: np.ndarray[Any, np.dtype[np.int64]], row: int) -> int:
    """The index of the segment whose rows include ``row`` (``starts``: each segment's first row, ascending)."""
    return int(np.searchsorted(starts, row, side="right")) - 1


def _as_numbers(values: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Dates as days and timestamps as their unit since the epoch, for comparing many rows at once."""
    width = pa.int32() if pa.types.is_date32(values.type) else pa.int64()
    return np.asarray(values.cast(width).to_numpy(), dtype=np.int64)


def _ledger_of(conn: psycopg.Connection[Any], segments: Sequence[Segment]) -> dict[Segment, tuple[str, int]]:
    """The ledger's (content hash, rows) of each segment that has a row, in one query."""
    rows = conn.execute(
        "SELECT s.i, l.content_hash, l.rows FROM refresher_segments l JOIN unnest(%b::text[], %b::text[], "
        "%b::date[]) WITH ORDINALITY AS s(symbol, timeframe, month, i) USING (symbol, timeframe, month)",
        _keys(segments),
    ).fetchall()
    return {segments[int(i) - 1]: (content_hash, int(n)) for i, content_hash, n in rows}


def _keys(segments: Sequence[Segment]) -> tuple[list[str], list[str], list[dt.date]]:
    """The segments' keys as three arrays. The statements here bind such arrays with ``%b`` (binary): psycopg
    dumps a text-format array element by element in Python, 7-11 ms for 3,000 dates or names against about 2 ms
    in binary, and a batch of the production profile's 3,000 daily segments binds 17 of them."""
    return [s.symbol for s in segments], [s.timeframe for s in segments], [s.month for s in segments]


def _delete_rows(conn: psycopg.Connection[Any], items: Sequence[SegmentLoad]) -> None:
    """Delete the rows of every item's segment: one statement per table, one index range scan per segment."""
    by_table: dict[str, list[SegmentLoad]] = {}
    for item in items:
        by_table.setdefault(item.segment.table, []).append(item)
    for table, group in by_table.items():
        bounds = [segment_range(item.segment, item.tz) for item in group]
        los, his = [b[0] for b in bounds], [b[1] for b in bounds]
        params: tuple[Any, ...] = ([item.segment.symbol for item in group], los, his)
        query = "DELETE FROM {table} d USING unnest(%b::text[], %b::{arr}, %b::{arr}) AS s(symbol, lo, hi) "
        query += "WHERE d.symbol = s.symbol AND d.{col} >= s.lo AND d.{col} < s.hi"
        if table in partitions.PARTITIONED:
            # The batch's whole range, as plain parameters: a month-partitioned table is pruned to the partitions
            # it touches when the statement starts (the join's bounds prune nothing; measured 30 s of a 48 s cold
            # backtesting load scanning every partition per segment). Only there: on a table no ANALYZE has seen
            # yet (a cold load's, mid-way) the planner gives such a range 0.5% of the rows, and scanned and
            # sorted the whole daily table for every batch (a merge join: 0.5-1 s a batch of the production
            # profile, growing with the table) instead of one range scan of its key per segment.
            query += " AND d.{col} >= %s AND d.{col} < %s"
            params += (min(los), max(his))
        statement = sql.SQL(query).format(
            table=sql.Identifier(table),
            col=sql.Identifier(TIME_COLUMN[table]),
            arr=sql.SQL(_TIME_ARRAY[table]),
        )
        conn.execute(statement, params)


def _bodies_month(
    items: Sequence[SegmentLoad],
    loaded: Sequence[pa.Table | bodies.StoredBody],
    ledger: dict[Segment, tuple[str, int]],
) -> dt.date | None:
    """The UTC month a batch fills by COPY bodies, or None (then it loads as Arrow tables): whole minute
    segments, none loaded before (no append, no shrink), every row in one month; and a stored body to send.
    The month's partition must still be new (``lock_new_months``, in the caller)."""
    if not any(isinstance(data, bodies.StoredBody) for data in loaded):
        return None
    months: set[dt.date] = set()
    for item, data in zip(items, loaded, strict=True):
        if item.segment.table != bodies.TABLE or item.segment in ledger or not data.num_rows:
            return None
        if isinstance(data, bodies.StoredBody):
            assert data.entry.start_ts is not None and data.entry.end_ts is not None  # ``_conformed`` checked
            months.update(partitions.months_of_range(data.entry.start_ts, data.entry.end_ts))
        else:
            months.update(partitions.months_of(data, TIME_COLUMN[bodies.TABLE]))
        if len(months) > 1:
            return None
    return months.pop()


def _fill_by_bodies(
    conn: psycopg.Connection[Any],
    items: Sequence[SegmentLoad],
    loaded: Sequence[pa.Table | bodies.StoredBody],
    month: dt.date,
) -> BatchOutcome:
    """``_write_batch`` of a batch that fills ``month``'s new partition whole: each segment's COPY body sent as
    the store kept it, or made of its rows (a segment without one), in the lock order of
    ``refresher.partitions``. The ledger's rows are the manifest's (or the table's), and the COPY must have read
    exactly that many."""
    raws = [data.body.raw if isinstance(data, bodies.StoredBody) else bodies.encode(data) for data in loaded]
    rows = [data.num_rows for data in loaded]
    columns = SCHEMA_OF["1m"].names
    table = bodies.TABLE

    def send(name: str) -> None:
        copied = copy_bodies(conn, name, columns, raws, freeze=name != table)
        if copied != sum(rows):
            raise LoadError(
                f"{_named([item.segment for item in items])}: the COPY read {copied} rows where the store's "
                f"segments hold {sum(rows)}",
                segment=str(items[0].segment),
            )

    partitions.create_filled(conn, table, month, send)
    partitions.lock_creators(conn, wait=SEGMENT_LOCK_WAIT)
    partitions.lock_default(conn, table, mode=partitions.ATTACHING, wait=SEGMENT_LOCK_WAIT)
    _delete_rows(conn, items)
    if not partitions.attach_filled(conn, table, month):
        send(table)
    _record(conn, list(zip(items, rows, strict=True)))
    _quarantine(conn, [(item.segment, item.rejects) for item in items if item.rejects is not None])
    return BatchOutcome(tuple(rows), frozenset(), ())


def _copy_statement(table: str, columns: Sequence[str], freeze: bool) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY{})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", FREEZE" if freeze else ""),
    )


def copy_bodies(
    conn: psycopg.Connection[Any],
    table: str,
    columns: Sequence[str],
    raws: Sequence[bytes | memoryview],
    *,
    freeze: bool = False,
) -> int:
    """Binary COPY of COPY bodies (``refresher.bodies``) into ``columns`` of ``table``, as ``copy_arrow``;
    returns the rows the server read."""
    with conn.cursor() as cur:
        with cur.copy(_copy_statement(table, columns, freeze)) as copy:
            copy.write(bodies.HEADER)
            for raw in raws:
                copy.write(raw if isinstance(raw, memoryview) else memoryview(raw))
            copy.write(bodies.TRAILER)
        return cur.rowcount


def copy_arrow(
    conn: psycopg.Connection[Any], table: str, columns: Sequence[str], data: pa.Table, *, freeze: bool = False
) -> None:
    """Binary COPY of ``data`` into ``columns`` of ``table``, inside the caller's transaction; ``freeze`` for a
    table created in that same transaction (see ``refresher.partitions``)."""
    statement = _copy_statement(table, columns, freeze)
    if data.num_columns and data.num_rows < _SMALL_CHUNK_ROWS * data.column(0).num_chunks:
        # A batch of small segments holds one chunk per segment (a month of daily bars is ~21 rows) and pgpq
        # pays about 55 us a batch: 3.3 s for the production profile's 60,000 segments, ~0.1 s combined.
        data = data.combine_chunks()
    encoder = ArrowToPostgresBinaryEncoder(data.schema)
    # An exception here (Ctrl-C included) makes psycopg send CopyFail, and the transaction rolls back.
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.write(encoder.write_header())
        for batch in data.to_batches(max_chunksize=BATCH_ROWS):
            # A view, not the bytes: psycopg cuts a buffer over 128 KB into pieces before libpq, and a piece of
            # bytes is a copy where a piece of a memoryview is not (the whole COPY stream, 0.8 GB for backtesting).
            copy.write(memoryview(encoder.write_batch(batch)))
        copy.write(encoder.finish())


def _record(conn: psycopg.Connection[Any], written: Sequence[tuple[SegmentLoad, int]]) -> None:
    if not written:
        return
    symbols, timeframes, months = _keys([item.segment for item, _ in written])
    conn.execute(
        "INSERT INTO refresher_segments (symbol, timeframe, month, content_hash, rows, loaded_at) "
        "SELECT *, now() FROM unnest(%b::text[], %b::text[], %b::date[], %b::text[], %b::bigint[]) "
        "ON CONFLICT (symbol, timeframe, month) DO UPDATE SET "
        "content_hash = EXCLUDED.content_hash, rows = EXCLUDED.rows, loaded_at = EXCLUDED.loaded_at",
        (symbols, timeframes, months, [item.content_hash for item, _ in written], [n for _, n in written]),
    )


def quarantined(conn: psycopg.Connection[Any], segments: Sequence[Segment]) -> set[Segment]:
    """Those of ``segments`` with rows in ``refresher_rejects``: their load writes the table again even when
    their content is unchanged (quarantine switched to skip leaves the same good rows)."""
    if not segments:
        return set()
    with conn.transaction():  # never leaves a transaction open on the caller's connection
        rows = conn.execute(
            "SELECT DISTINCT r.symbol, r.timeframe, r.month FROM refresher_rejects r "
            "JOIN unnest(%b::text[], %b::text[], %b::date[]) AS s(symbol, timeframe, month) "
            "ON r.symbol = s.symbol AND r.timeframe = s.timeframe AND r.month = s.month",
            _keys(segments),
        ).fetchall()
    held = {(symbol, timeframe, month) for symbol, timeframe, month in rows}
    return {s for s in segments if (s.symbol, s.timeframe, s.month) in held}


def _quarantine(conn: psycopg.Connection[Any], segments: Sequence[tuple[Segment, Sequence[Reject]]]) -> None:
    """Replace each segment's rows in ``refresher_rejects`` with its rejects."""
    if not segments:
        return
    conn.execute(
        "DELETE FROM refresher_rejects r USING unnest(%b::text[], %b::text[], %b::date[]) AS s(symbol, "
        "timeframe, month) WHERE r.symbol = s.symbol AND r.timeframe = s.timeframe AND r.month = s.month",
        _keys([segment for segment, _ in segments]),
    )
    rejected = [
        (segment.symbol, segment.timeframe, segment.month, r.source, r.row, r.rule, r.column, r.raw)
        for segment, rejects in segments
        for r in rejects
    ]
    if rejected:
        with conn.cursor() as cur:
            cur.executemany(
                'INSERT INTO refresher_rejects (symbol, timeframe, month, source, row, rule, "column", raw) '
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
                rejected,
            )


__all__ = [
    "BATCH_ROWS",
    "SEGMENT_LOCK_WAIT",
    "BatchOutcome",
    "SegmentLoad",
    "ShrinkError",
    "conform",
    "conform_many",
    "copy_arrow",
    "copy_bodies",
    "delete_segment",
    "load_segment",
    "load_segments",
    "lock_segments",
    "quarantined",
    "segment_lock_id",
    "server_said",
]
