"""A design probe, not a ``make bench`` row: would storing each minute segment's binary COPY body beside its
Parquet file bring the warm-store row (backtesting into a new database, goal 5 s) under its goal?

    python -m bench.probe_copy_bodies [--store DIR] [--pairs 3]

The segments phase of that row, reduced to what differs: the 12 months of minute bars filled into a new
database's month partitions on two connections, as ``refresher.partitions`` does (CREATE TABLE with the month's
CHECK, COPY FREEZE, the primary key, ATTACH), from

* ``parquet``: each segment's Parquet file read and its rows encoded by pgpq (``refresher.load.copy_arrow``);
* ``bodies``: each segment's COPY body (pgpq's output without header and trailer) read from an LZ4 file made
  beforehand and written as it is.

Everything else the refresh does (plan, ledger, checks, snapshot) is left out: the pairs tell the client CPU and
the wall time such a cache would save, and the sizes tell its cost. Without ``--store``, one is filled first by
a cold backtesting refresh into a scratch server. Results: docs/architecture.md, "Where the load's CPU goes".
"""

from __future__ import annotations

import argparse
import datetime as dt
import queue
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

from refresher.database import ensure_schema
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.load import copy_arrow
from refresher.partitions import month_bounds, partition_name

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_TRAILER = b"\xff\xff"
_COLUMNS = ("symbol", "ts", "open", "high", "low", "close", "volume")
_LZ4 = pa.Codec("lz4")


def _minute_files(store: Path) -> dict[dt.date, list[Path]]:
    """The store's minute segment files by month (of their first bar, exchange time or not: mid-month)."""
    months: dict[dt.date, list[Path]] = {}
    for path in sorted(store.glob("data/*/seg-*.parquet")):
        meta = pq.read_metadata(path)
        if tuple(meta.schema.names) != _COLUMNS:
            continue
        first = dt.datetime.fromtimestamp(int(meta.metadata[b"featurestore.start_ns"]) // 10**9, dt.UTC)
        months.setdefault((first + dt.timedelta(days=3)).date().replace(day=1), []).append(path)
    return months


def _write_bodies(months: dict[dt.date, list[Path]], into: Path) -> tuple[int, int]:
    """Each file's COPY body, LZ4: its raw length (8 bytes) then the frame. Returns (raw, stored) bytes."""
    raw = stored = 0
    for path in (p for paths in months.values() for p in paths):
        table = pq.ParquetFile(path).read()
        encoder = ArrowToPostgresBinaryEncoder(table.schema)
        encoder.write_header()
        body = (
            b"".join(encoder.write_batch(b) for b in table.to_batches()) + encoder.finish()[: -len(_TRAILER)]
        )
        packed = len(body).to_bytes(8, "little") + _LZ4.compress(body, asbytes=True)
        (into / f"{path.stem}.lz4").write_bytes(packed)
        raw, stored = raw + len(body), stored + len(packed)
    return raw, stored


def _fill(conn: psycopg.Connection, month: dt.date, paths: list[Path], bodies: Path | None) -> None:
    name, (lo, hi) = partition_name("ohlcv_1min", month), month_bounds(month)
    leaf = sql.Identifier(name)
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE ohlcv_1min INCLUDING DEFAULTS, CHECK (ts >= {} AND ts < {}))"
            ).format(leaf, sql.Literal(lo), sql.Literal(hi))
        )
        if bodies is None:
            tables = []
            for path in paths:
                tables.append(pq.ParquetFile(pa.BufferReader(path.read_bytes())).read())
            copy_arrow(conn, name, _COLUMNS, pa.concat_tables(tables), freeze=True)
        else:
            statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY, FREEZE)").format(
                leaf, sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
            )
            with conn.cursor() as cur, cur.copy(statement) as copy:
                copy.write(_HEADER)
                for path in paths:
                    packed = memoryview((bodies / f"{path.stem}.lz4").read_bytes())
                    size = int.from_bytes(packed[:8], "little")
                    copy.write(memoryview(_LZ4.decompress(packed[8:], decompressed_size=size)))
                copy.write(_TRAILER)
        conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (symbol, ts)").format(leaf))
        conn.execute(
            sql.SQL("ALTER TABLE ohlcv_1min ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                leaf, sql.Literal(lo), sql.Literal(hi)
            )
        )


def _load(
    server: ServerInfo, db: str, months: dict[dt.date, list[Path]], bodies: Path | None
) -> dict[str, float]:
    """The months into a new database on two connections; wall and client CPU seconds, rows."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    with psycopg.connect(server.dsn(db), autocommit=True) as conn:
        ensure_schema(conn)
    todo: queue.Queue[dt.date] = queue.Queue()
    for month in sorted(months):
        todo.put(month)
    failed: list[BaseException] = []

    def loader() -> None:
        try:
            with psycopg.connect(server.dsn(db), autocommit=True) as conn:
                while not todo.empty():
                    month = todo.get()
                    _fill(conn, month, months[month], bodies)
        except BaseException as exc:  # reported by the caller
            failed.append(exc)

    cpu, wall = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=loader) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if failed:
        raise failed[0]
    with psycopg.connect(server.dsn(db)) as conn:
        row = conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(db)))
    return {"wall": wall, "cpu": cpu, "rows": row[0] if row else 0}


def _filled_store(work: Path) -> Path:
    from featurestore import FeatureStore
    from refresher.profile import load_profile
    from refresher.refresh import refresh
    from refresher.settings import Settings

    settings = Settings.from_env(state_dir=work / "fill-state", store_root=work / "store")
    engine = LocalEngine(settings.state_dir)
    try:
        profile = load_profile("backtesting", settings.profiles_dirs, as_of=dt.date(2025, 10, 31))
        refresh(profile, engine, FeatureStore(settings.store_root))
    finally:
        engine.stop("backtesting")
    return settings.store_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="a store holding backtesting's minute segments")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refresher-probe-", dir="/tmp"))
    work.chmod(0o755)  # the embedded server runs as another user when we are root
    engine = LocalEngine(work / "state")
    try:
        months = _minute_files(args.store or _filled_store(work))
        (work / "bodies").mkdir()
        raw, stored = _write_bodies(months, work / "bodies")
        parquet = sum(p.stat().st_size for paths in months.values() for p in paths)
        print(
            f"{sum(map(len, months.values()))} minute segments over {len(months)} months: Parquet {parquet:,} B, "
        )
        print(f"COPY bodies {raw:,} B raw, {stored:,} B in LZ4 ({stored / parquet:.2f}x the Parquet files)")
        server = engine.start("probe")
        runs: dict[str, list[dict[str, float]]] = {"parquet": [], "bodies": []}
        for k in range(args.pairs):
            for kind in ("parquet", "bodies") if k % 2 == 0 else ("bodies", "parquet"):
                run = _load(
                    server, f"probe_{kind}_{k}", months, work / "bodies" if kind == "bodies" else None
                )
                runs[kind].append(run)
                print(
                    f"pair {k + 1} {kind:8s} wall {run['wall']:.2f} s, client CPU {run['cpu']:.2f} s, {run['rows']:,} rows"
                )
        assert len({r["rows"] for rs in runs.values() for r in rs}) == 1, "both ways load the same rows"
        for key in ("wall", "cpu"):
            old, new = (statistics.median(r[key] for r in runs[kind]) for kind in ("parquet", "bodies"))
            print(f"{key}: median {old:.2f} -> {new:.2f} s ({old / new:.2f}x)")
    finally:
        engine.stop("probe")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
