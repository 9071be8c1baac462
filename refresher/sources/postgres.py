"""Bars copied from an upstream PostgreSQL (a subset of a production database).

Options: ``dsn``, ``daily_table`` and ``minute_table`` (``schema.table`` allowed), ``columns`` (our column ->
theirs, as for the files source), ``tz`` (zone of a naive ``timestamp`` column; default UTC), ``version``
(a string you bump to force a re-fetch) and ``version_query`` (default true: the version also includes the
segment's row count and latest timestamp upstream, one indexed aggregate per segment).

Table and column names reach SQL only as ``sql.Identifier``; the symbol and dates are parameters.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import zoneinfo
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from refresher.calendar import get_calendar
from refresher.errors import SourceError
from refresher.profile import Profile
from refresher.schema import SCHEMA_OF, empty_table
from refresher.segments import Segment
from refresher.sources.base import effective_range

_DEFAULT_COLUMNS = {
    "symbol": "symbol",
    "date": "date",
    "ts": "ts",
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "volume": "volume",
}


def _table_ident(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split(".", 1))


class PostgresSource:
    """Segments selected from an upstream database, one query per segment."""

    kind = "postgres"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        opts = profile.source.options
        self.dsn = str(opts["dsn"])
        self.tables = {
            "1d": opts.get("daily_table", "ohlcv_daily"),
            "1m": opts.get("minute_table", "ohlcv_1min"),
        }
        self.columns: Mapping[str, str] = {**_DEFAULT_COLUMNS, **dict(opts.get("columns", {}))}
        self.tz = str(opts.get("tz", "UTC"))
        self.user_version = str(opts.get("version", ""))
        self.version_query = bool(opts.get("version_query", True))
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    @contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        # One connection for the source's lifetime: a no-op refresh asks for hundreds of versions.
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                # aware UTC parameters then compare correctly with naive UTC `timestamp` columns too
                self._conn.execute("SET TIME ZONE 'UTC'")
            except psycopg.OperationalError as exc:
                raise SourceError(
                    f"source.dsn: cannot connect to the upstream database: {exc}".strip()
                ) from exc
        try:
            with self._conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            raise SourceError(f"upstream query failed: {str(exc).strip()}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> PostgresSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bounds(self, segment: Segment) -> tuple[object, ...] | None:
        """Half-open [lo, hi) on the time column: session dates for daily, session instants for minute."""
        rng = effective_range(self.profile, segment)
        if rng is None:
            return None
        if segment.timeframe == "1d":
            return rng[0], rng[1] + dt.timedelta(days=1)
        cal = get_calendar(self.profile.listing(segment.symbol).exchange)
        sl = cal.session_slice(*rng)
        if sl.stop <= sl.start:
            return None
        lo, hi = int(cal.opens[sl.start]), int(cal.closes[sl.stop - 1])
        if self.tz != "UTC":  # a naive column: compare in its own zone
            zone = zoneinfo.ZoneInfo(self.tz)
            return tuple(dt.datetime.fromtimestamp(ns / 1e9, zone).replace(tzinfo=None) for ns in (lo, hi))
        return dt.datetime.fromtimestamp(lo / 1e9, dt.UTC), dt.datetime.fromtimestamp(hi / 1e9, dt.UTC)

    def _where(self, segment: Segment) -> sql.Composed:
        when = self.columns["date" if segment.timeframe == "1d" else "ts"]
        return sql.SQL("FROM {table} WHERE {sym} = %s AND {when} >= %s AND {when} < %s").format(
            table=_table_ident(str(self.tables[segment.timeframe])),
            sym=sql.Identifier(self.columns["symbol"]),
            when=sql.Identifier(when),
        )

    def version(self, segment: Segment) -> str:
        listing = self.profile.listing(segment.symbol)
        config = [self.dsn, self.tables, sorted(self.columns.items()), self.tz, self.user_version]
        parts: list[object] = [config, listing.exchange, str(effective_range(self.profile, segment))]
        bounds = self._bounds(segment)
        if self.version_query and bounds is not None:
            when = self.columns["date" if segment.timeframe == "1d" else "ts"]
            query = sql.SQL("SELECT count(*), max({when})::text ").format(when=sql.Identifier(when))
            with self._cursor() as cur:
                cur.execute(query + self._where(segment), (segment.symbol, *bounds))
                parts.append(list(cur.fetchone() or ()))
        # sha256 so a password in the DSN never appears in a version token
        return "postgres/" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]

    def fetch(self, segment: Segment) -> pa.Table:
        bounds = self._bounds(segment)
        if bounds is None:
            return empty_table(segment.timeframe)
        c = self.columns
        when = c["date" if segment.timeframe == "1d" else "ts"]
        cast_when = sql.SQL("{}::date") if segment.timeframe == "1d" else sql.SQL("{}")
        select = sql.SQL(
            "SELECT {when}, {o}::float8, {h}::float8, {l}::float8, {c}::float8, round({v})::int8 "
        ).format(
            when=cast_when.format(sql.Identifier(when)),
            o=sql.Identifier(c["open"]),
            h=sql.Identifier(c["high"]),
            l=sql.Identifier(c["low"]),
            c=sql.Identifier(c["close"]),
            v=sql.Identifier(c["volume"]),
        )
        order = sql.SQL(" ORDER BY {}").format(sql.Identifier(when))
        with self._cursor() as cur:
            cur.execute(select + self._where(segment) + order, (segment.symbol, *bounds))
            rows = cur.fetchall()
        if not rows:
            return empty_table(segment.timeframe)
        cols = list(zip(*rows, strict=True))
        if segment.timeframe == "1d":
            when_arr = pa.array(cols[0], pa.date32())
        else:
            zone = dt.UTC if self.tz == "UTC" else zoneinfo.ZoneInfo(self.tz)
            # timestamptz arrives aware; a naive timestamp column is in the configured zone
            utc = [(w if w.tzinfo else w.replace(tzinfo=zone)).astimezone(dt.UTC) for w in cols[0]]  # type: ignore[attr-defined]
            when_arr = pa.array(utc, pa.timestamp("us", tz="UTC"))
        prices = [pa.array(np.asarray(col, dtype=np.float64)) for col in cols[1:5]]
        volume = pa.array(np.asarray(cols[5], dtype=np.int64))
        symbols = pa.array([segment.symbol] * len(rows), pa.string())
        return pa.Table.from_arrays([symbols, when_arr, *prices, volume], schema=SCHEMA_OF[segment.timeframe])


__all__ = ["PostgresSource"]
