"""Loader and reset numbers: binary COPY (pgpq) against CSV COPY and pandas ``to_sql``; reset by pool rename
against a template clone.

Every contender does the same work per segment on the same fresh embedded server: delete the segment's range,
load its rows into ``ohlcv_1min`` (primary key in place), write its ``refresher_segments`` row, commit. Encoding
time (Arrow -> binary, Arrow -> CSV) counts. ``to_sql`` runs on a slice and is reported as rows/s.
"""

from __future__ import annotations

import datetime as dt
import io
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from refresher import snapshot
from refresher.database import ensure_schema, segment_range
from refresher.engines import local
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.load import SegmentLoad, copy_arrow, load_segment, load_segments
from refresher.partitions import month_bounds, partition_name
from refresher.pool import refill_pool
from refresher.schema import MINUTE_SCHEMA
from refresher.segments import Segment

TZ = "America/New_York"
MONTH = dt.date(2024, 1, 1)
ROWS_PER_SEGMENT = 40_000  # < 44,640 minutes in January


def _bars(rng: np.random.Generator, symbol: str, first: np.datetime64, n: int) -> pa.Table:
    close = 100 + rng.standard_normal(n).cumsum()
    ts = pa.array(first + np.arange(n).astype("timedelta64[m]"), pa.timestamp("us", tz="UTC"))
    columns = [pa.array([symbol] * n), ts, close, close + 0.5, close - 0.5, close, rng.integers(1, 10_000, n)]
    return pa.table(columns, schema=MINUTE_SCHEMA)


def _segments(total_rows: int) -> list[tuple[Segment, pa.Table]]:
    rng = np.random.default_rng(7)
    first = np.datetime64("2024-01-01T05:00", "us")
    out = []
    for k, offset in enumerate(range(0, total_rows, ROWS_PER_SEGMENT)):
        n = min(ROWS_PER_SEGMENT, total_rows - offset)
        out.append((Segment(f"S{k:04d}", "1m", MONTH), _bars(rng, f"S{k:04d}", first, n)))
    return out


def _months(months: int, per_month: int) -> list[list[tuple[Segment, pa.Table]]]:
    """``per_month`` symbols' minute bars for each of ``months`` months of 2024 (one list per month)."""
    rng = np.random.default_rng(11)
    out = []
    for m in range(1, months + 1):
        first = np.datetime64(f"2024-{m:02d}-01T05:00", "us")  # midnight in New York: inside the segment
        out.append(
            [
                (
                    Segment(f"S{k:04d}", "1m", dt.date(2024, m, 1)),
                    _bars(rng, f"S{k:04d}", first, ROWS_PER_SEGMENT),
                )
                for k in range(per_month)
            ]
        )
    return out


# ohlcv_1min as databases made before month partitions have it: the baseline of the partition row.
_PLAIN_MINUTES = """CREATE TABLE ohlcv_1min (symbol text NOT NULL, ts timestamptz NOT NULL, open float8 NOT NULL,
    high float8 NOT NULL, low float8 NOT NULL, close float8 NOT NULL, volume int8 NOT NULL,
    CONSTRAINT ohlcv_1min_pkey PRIMARY KEY (symbol, ts))"""


def _month_load_seconds(
    server: ServerInfo, months: list[list[tuple[Segment, pa.Table]]], *, plain: bool
) -> float:
    """Seconds to load ``months``, one transaction per month as a refresh does, into a new database: month
    partitions (the first load of a month creates its partition and fills it with COPY FREEZE), or ``plain``."""
    name = "bench_plain" if plain else "bench_partitioned"
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    target = replace(server, dbname=name)
    with psycopg.connect(target.dsn(), autocommit=True) as conn:
        if plain:
            conn.execute(_PLAIN_MINUTES)
        ensure_schema(conn)  # keeps a plain ohlcv_1min as it is
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        for batch in months:
            load_segments(conn, [SegmentLoad(segment, table, "h", TZ) for segment, table in batch])
        return time.perf_counter() - started


def _key_first_seconds(server: ServerInfo, months: list[list[tuple[Segment, pa.Table]]]) -> float:
    """Seconds to load ``months`` into new month partitions made with their primary key before the COPY FREEZE
    (as the loader did before): the baseline of the key-after row. No DELETE and no ledger rows, so it is, if
    anything, favoured."""
    target = _fresh_db(server, "bench_key_first")
    with psycopg.connect(target.dsn(), autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        for batch in months:
            data = pa.concat_tables([table for _, table in batch])
            month = batch[0][0].month
            name = sql.Identifier(partition_name("ohlcv_1min", month))
            lo, hi = (sql.Literal(bound) for bound in month_bounds(month))
            with conn.transaction():
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (LIKE ohlcv_1min INCLUDING DEFAULTS, CHECK (ts >= {} AND ts < {}), "
                        "PRIMARY KEY (symbol, ts))"
                    ).format(name, lo, hi)
                )
                copy_arrow(conn, partition_name("ohlcv_1min", month), data.schema.names, data, freeze=True)
                conn.execute(
                    sql.SQL("ALTER TABLE ohlcv_1min ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                        name, lo, hi
                    )
                )
        return time.perf_counter() - started


def _fresh_db(server: ServerInfo, name: str) -> ServerInfo:
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    target = replace(server, dbname=name)
    with psycopg.connect(target.dsn()) as conn:
        ensure_schema(conn)
    return target


def _binary_rate(server: ServerInfo, segments: list[tuple[Segment, pa.Table]]) -> float:
    target = _fresh_db(server, "bench_binary")
    rows: int = sum(t.num_rows for _, t in segments)
    with psycopg.connect(target.dsn()) as conn:
        started = time.perf_counter()
        for segment, table in segments:
            load_segment(conn, segment, table, "h", tz=TZ)
        return rows / (time.perf_counter() - started)


def _csv_rate(server: ServerInfo, segments: list[tuple[Segment, pa.Table]]) -> float:
    target = _fresh_db(server, "bench_csv")
    rows: int = sum(t.num_rows for _, t in segments)
    with psycopg.connect(target.dsn()) as conn:
        started = time.perf_counter()
        for segment, table in segments:
            buffer = io.BytesIO()
            pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
            lo, hi = segment_range(segment, TZ)
            with conn.transaction():
                conn.execute(
                    "DELETE FROM ohlcv_1min WHERE symbol = %s AND ts >= %s AND ts < %s",
                    (segment.symbol, lo, hi),
                )
                with conn.cursor().copy("COPY ohlcv_1min FROM STDIN (FORMAT csv)") as copy:
                    copy.write(buffer.getvalue())
                conn.execute(
                    "INSERT INTO refresher_segments VALUES (%s, %s, %s, 'h', %s, now())",
                    (segment.symbol, segment.timeframe, segment.month, table.num_rows),
                )
        return rows / (time.perf_counter() - started)


def _to_sql_rate(server: ServerInfo, table: pa.Table) -> float:
    from sqlalchemy import create_engine

    target = _fresh_db(server, "bench_to_sql")
    engine = create_engine(target.dsn().replace("postgresql://", "postgresql+psycopg://"))
    frame = table.to_pandas()
    try:
        started = time.perf_counter()
        frame.to_sql("ohlcv_1min", engine, if_exists="append", index=False, method="multi", chunksize=5_000)
        return float(table.num_rows) / (time.perf_counter() - started)
    finally:
        engine.dispose()


def _reset_latencies(
    server: ServerInfo, segments: list[tuple[Segment, pa.Table]], repeat: int
) -> dict[str, float]:
    target = _fresh_db(server, "bench_reset")
    with psycopg.connect(target.dsn()) as conn:
        for segment, table in segments:
            load_segment(conn, segment, table, "h", tz=TZ)
    snapshot.save_pristine(target, pool_size=1)
    pool, template = [], []
    for _ in range(repeat):
        refill_pool(target)
        report = snapshot.restore_pristine(target, refill=False)
        assert report.method == "pool"
        pool.append(report.seconds)
        report = snapshot.restore_pristine(target, refill=False)  # the pool is empty now
        assert report.method == "template"
        template.append(report.seconds)
    snapshot.drop_snapshot(target)
    return {"pool": statistics.median(pool), "template": statistics.median(template)}


def run(quick: bool = False) -> list[dict[str, Any]]:
    total = 300_000 if quick else 2_000_000
    reset_rows = 300_000 if quick else 1_000_000
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-load-", dir="/tmp"))
    work.chmod(0o755)  # the embedded server runs as another user when we are root
    engine = LocalEngine(work)
    try:
        server = engine.start("bench_load")
        # The baseline of the checksum row: a cluster as initdb made them before --no-data-checksums (initdb
        # takes the last of the two flags).
        with mock.patch.object(local, "INITDB_ARGS", (*local.INITDB_ARGS, "--data-checksums")):
            checksummed = engine.start("bench_load_checksums")
        segments = _segments(total)
        rows: int = sum(t.num_rows for _, t in segments)
        binary = _binary_rate(server, segments)
        csv = _csv_rate(server, segments)
        to_sql = _to_sql_rate(server, segments[0][1].slice(0, 20_000))
        resets = _reset_latencies(server, _segments(reset_rows), repeat=3 if quick else 5)
        months = _months(2 if quick else 6, 10)
        month_rows = sum(t.num_rows for batch in months for _, t in batch)
        # Alternated and the best of each kept: the machine is shared, and the first run warms the caches.
        plain_s = min(_month_load_seconds(server, months, plain=True) for _ in range(2))
        partitioned_s = min(_month_load_seconds(server, months, plain=False) for _ in range(2))
        key_first_s = min(_key_first_seconds(server, months) for _ in range(2))
        no_checksums, checksums = [], []
        for _ in range(3):
            no_checksums.append(_month_load_seconds(server, months, plain=False))
            checksums.append(_month_load_seconds(checksummed, months, plain=False))
    finally:
        engine.stop("bench_load_checksums")
        engine.stop("bench_load")
        shutil.rmtree(work, ignore_errors=True)
    return [
        {"benchmark": f"load {rows:,} minute bars: binary COPY vs CSV COPY", "ours": binary, "baseline": csv,
         "unit": "rows/s", "ratio": binary / csv},
        {"benchmark": "load minute bars: binary COPY vs pandas to_sql (20k-row slice)", "ours": binary,
         "baseline": to_sql, "unit": "rows/s", "ratio": binary / to_sql},
        {"benchmark": f"reset a {reset_rows:,}-row database: pool rename vs template clone",
         "ours": resets["pool"] * 1000, "baseline": resets["template"] * 1000, "unit": "ms (median)",
         "ratio": resets["template"] / resets["pool"]},
        {"benchmark": f"load {month_rows:,} minute bars a month per transaction: new month partition (COPY FREEZE) "
         "vs plain table", "ours": month_rows / partitioned_s, "baseline": month_rows / plain_s,
         "unit": "rows/s", "ratio": plain_s / partitioned_s,
         "note": "goal: >= 1.3x (no WAL for a partition made in the load's transaction, wal_level=minimal)"},
        {"benchmark": f"load {month_rows:,} minute bars into new month partitions: primary key after the COPY "
         "FREEZE vs before", "ours": month_rows / partitioned_s, "baseline": month_rows / key_first_s,
         "unit": "rows/s", "ratio": key_first_s / partitioned_s,
         "note": "ours: the loader (delete, COPY FREEZE, ADD PRIMARY KEY, attach, ledger); baseline: the key made "
         "with the table, then COPY FREEZE and attach; goal: > 1x"},
        {"benchmark": f"load {month_rows:,} minute bars into new month partitions: page checksums off vs on",
         "ours": month_rows / min(no_checksums), "baseline": month_rows / min(checksums), "unit": "rows/s",
         "ratio": min(checksums) / min(no_checksums),
         "note": "ours: a new local cluster (initdb --no-data-checksums, PG 18); baseline: a second one made with "
         "checksums (PG 18's default), alternating, best of 3; goal: >= 1x (the server computes no page checksums)"},
    ]  # fmt: skip


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | ours | baseline | unit | ratio |", "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['ours']:,.1f} | {r['baseline']:,.1f} | {r['unit']} | {r['ratio']:.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(_markdown(run(quick="--quick" in sys.argv)))
