"""Bars copied from an upstream PostgreSQL (a subset of a production database).

Options: ``dsn``, ``daily_table`` and ``minute_table`` (``schema.table`` allowed), ``columns`` (our column ->
theirs, as for the files source), ``tz`` (zone of a naive ``timestamp`` column; default UTC), ``version``
(a string you bump to force a re-fetch) and ``version_query`` (default true: the version also includes the
segment's row count, latest timestamp and the sum of its rows' hashes upstream, one aggregate per segment, so a
corrected value is fetched again; PostgreSQL 14 or later upstream), and ``queries``
(timeframe -> your own SELECT returning ``date``/``ts``, ``open``, ``high``, ``low``, ``close``, ``volume``,
with ``%(symbol)s``, ``%(start)s`` and ``%(end)s`` placeholders; bounds are half-open [start, end)).
Every row is validated like any source's (``refresher.sources.validate``).

Table and column names reach SQL only as ``sql.Identifier``; the symbol and dates are parameters.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import zoneinfo
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
from psycopg import sql

from refresher.calendar import exchange_tz, get_calendar
from refresher.dsn import parse_dsn
from refresher.errors import SourceError, one_line
from refresher.profile import PostgresSourceSpec, Profile
from refresher.schema import empty_table
from refresher.segments import Segment
from refresher.sources._sql_text import statement_body
from refresher.sources.base import Source, effective_range, reader_tag
from refresher.sources.validate import I64, VALUE_COLUMNS, Bars, Mask, bars_table, screen

# Bump whenever this module hands over other rows for the same upstream rows and options (``base.reader_tag``).
# Versions before 2 had no tag: a timestamptz daily column dated in UTC (ec1e023), rows with a NULL day or time
# never selected nor reported (b855d4c, 37899b6). 3: a fractional volume (100.5) is a bad row, 2 rounded it.
# 4: a minute time not on a whole minute (09:30:30) is a bad row; 3 dropped it as outside trading minutes.
READER_VERSION = 4

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


class PostgresSource(Source):
    """Segments selected from an upstream database, one query per segment."""

    kind = "postgres"

    def __init__(self, profile: Profile) -> None:
        super().__init__(profile)
        spec = profile.source
        assert isinstance(spec, PostgresSourceSpec)
        self.spec = spec
        self.dsn = spec.dsn
        self.tables = {"1d": spec.daily_table, "1m": spec.minute_table}
        self.columns: Mapping[str, str] = {**_DEFAULT_COLUMNS, **dict(spec.columns.items())}
        self.tz = spec.tz
        try:
            zoneinfo.ZoneInfo(self.tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:  # a traceback mid-refresh before
            raise SourceError(
                f"source.tz={self.tz!r}: unknown time zone ({exc})", field="source.tz", value=self.tz
            ) from None
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._undated: dict[tuple[str, str], dt.date | None] = {}  # (symbol, timeframe) -> ``_takes_undated``
        self._session_zone = ""

    def _zone(self, segment: Segment) -> str:
        """The upstream session's TimeZone for the segment's queries.

        Minute bars: UTC, so aware UTC parameters compare correctly with naive UTC ``timestamp`` columns too.
        Daily bars: the exchange's zone, so a ``timestamptz`` day (a Tokyo bar at local midnight, the day before
        in UTC) is cast to, and bounded by, the exchange's local date; ``date`` and naive columns are unaffected.
        """
        return (
            exchange_tz(self.profile.listing(segment.symbol).exchange) if segment.timeframe == "1d" else "UTC"
        )

    @contextmanager
    def _cursor(self, segment: Segment) -> Iterator[psycopg.Cursor[tuple[object, ...]]]:
        # One connection for the source's lifetime: a no-op refresh asks for hundreds of versions.
        if self._conn is None or self._conn.closed:
            # Checked first: a password's unescaped '@' became the host, and libpq's message showed it.
            parse_dsn(self.dsn, "source.dsn", SourceError)
            try:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
                self._session_zone = ""
            except psycopg.OperationalError as exc:
                raise SourceError(
                    f"source.dsn: cannot connect to the upstream database: {one_line(exc)}"
                ) from exc
        try:
            zone = self._zone(segment)
            if zone != self._session_zone:  # one round trip when it changes, not one per query
                self._conn.execute("SELECT set_config('TimeZone', %s, false)", [zone])
                self._session_zone = zone
            with self._conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            # the table (or query) named: 'invalid input syntax for type double precision: "abc"' said neither
            reason = _one_line(exc)
            client = isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None
            if client and segment.timeframe in self.spec.queries:
                # psycopg's own words on the query's placeholders, before it reached the server ("only '%s',
                # '%b', '%t' are allowed as placeholders, got '%''" for a LIKE 'A%'), say not which ones we send
                reason += f"; {_PLACEHOLDERS}"
            raise SourceError(f"{self._where(segment)}: upstream query failed: {reason}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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

    def _query(self, segment: Segment) -> sql.SQL | sql.Composed:
        """The segment's rows as (date|ts, open, high, low, close, volume), named so; the user's query if any.

        The symbol and bounds are always parameters (``%(symbol)s``, ``%(start)s``, ``%(end)s``), never text.
        """
        key = "date" if segment.timeframe == "1d" else "ts"
        custom = self.spec.queries.get(segment.timeframe)
        if custom is not None:
            # A query pasted from psql ends in ';' (perhaps a comment after it), which the version query's
            # subquery refused ('syntax error at or near ";"') while a fetch ran it: the statement's end is no
            # part of the rows.
            text = statement_body(custom)
            return sql.SQL(text)  # type: ignore[arg-type]  # the profile's own text, not user data
        c = self.columns
        when = sql.Identifier(c[key])
        # A row whose time is NULL belongs to no month: the symbol's first segment takes it, as the files source
        # charges a date that does not parse, so it is a bad row (it was never selected, never reported).
        undated = sql.SQL(" OR {} IS NULL").format(when) if self._takes_undated(segment) else sql.SQL("")
        return sql.SQL(
            "SELECT {when_out} AS {key}, {o}::float8 AS open, {h}::float8 AS high, {l}::float8 AS low, "
            "{c}::float8 AS close, {v}::float8 AS volume FROM {table} "
            "WHERE {sym} = %(symbol)s AND ({when} >= %(start)s AND {when} < %(end)s{undated}) ORDER BY {when}"
        ).format(
            undated=undated,
            when_out=sql.SQL("{}::date" if key == "date" else "{}").format(when),
            key=sql.Identifier(key),
            o=sql.Identifier(c["open"]),
            h=sql.Identifier(c["high"]),
            l=sql.Identifier(c["low"]),
            c=sql.Identifier(c["close"]),
            v=sql.Identifier(c["volume"]),
            table=_table_ident(self.tables[segment.timeframe]),
            sym=sql.Identifier(c["symbol"]),
            when=when,
        )

    def _takes_undated(self, segment: Segment) -> bool:
        """Whether ``segment`` takes its symbol's rows without a time: the first of its segments with bounds.
        The profile's first month was: one without a session of minute bars (a start on its last weekend) or
        before the symbol's listing is never queried, and the rows went unreported."""
        key = (segment.symbol, segment.timeframe)
        if key not in self._undated:
            months = (dataclasses.replace(segment, month=m) for m in self.profile.months)
            self._undated[key] = next((s.month for s in months if self._bounds(s) is not None), None)
        return segment.month == self._undated[key]

    def _where(self, segment: Segment) -> str:
        """What a message names as the rows' origin: the upstream table, or the profile's own query."""
        if segment.timeframe in self.spec.queries:
            return f"postgres:source.queries.{segment.timeframe}"
        return f"postgres:{self.tables[segment.timeframe]}"

    def _params(self, segment: Segment, bounds: tuple[object, ...]) -> dict[str, object]:
        return {"symbol": segment.symbol, "start": bounds[0], "end": bounds[1]}

    def version(self, segment: Segment) -> str:
        listing = self.profile.listing(segment.symbol)
        spec = self.spec
        config = [self.dsn, self.tables, sorted(self.columns.items()), self.tz, spec.version]
        config += [sorted(spec.queries.items()), spec.on_bad_rows]
        parts: list[object] = [config, listing.exchange, str(effective_range(self.profile, segment))]
        bounds = self._bounds(segment)
        if spec.version_query and bounds is not None:
            key = sql.Identifier("date" if segment.timeframe == "1d" else "ts")
            # The sum of each row's hash (the binary values, no text made) sees a corrected value too; count and
            # latest time alone did not. It reads the rows' heap where count(*) and max() read only the index:
            # 100 symbols x a month of 1-minute bars, about 20x count/max's time and half a fetch's.
            query = sql.SQL(
                "SELECT count(*), max({key})::text, sum(hash_record_extended(segment_rows, 0))::text "
                # the line break: a query ending in a `-- comment` (folded by YAML's >-) commented the ')' out
                "FROM ({rows}\n) AS segment_rows"
            ).format(key=key, rows=self._query(segment))
            with self._cursor(segment) as cur:
                refused = _version_query_refused(cur.connection.info.server_version)
                if refused is not None:
                    raise refused
                cur.execute(query, self._params(segment, bounds))
                parts.append(list(cur.fetchone() or ()))
        # sha256 so a password in the DSN never appears in a version token
        return (
            reader_tag(self.kind, READER_VERSION)
            + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]
        )

    def fetch(self, segment: Segment) -> pa.Table:
        bounds = self._bounds(segment)
        if bounds is None:
            return empty_table(segment.timeframe)
        key = "date" if segment.timeframe == "1d" else "ts"
        with self._cursor(segment) as cur:
            cur.execute(self._query(segment), self._params(segment, bounds))
            names = [d.name for d in cur.description or ()]
            rows = cur.fetchall()
        missing = [n for n in (key, *VALUE_COLUMNS) if n not in names]
        if missing:
            raise SourceError(
                f"source.queries.{segment.timeframe}: the query returns no column {missing[0]!r} "
                f"(it returns {', '.join(names)}; name them {key}, {', '.join(VALUE_COLUMNS)})",
                field=f"source.queries.{segment.timeframe}",
                value=missing[0],
            )
        if not rows:
            return empty_table(segment.timeframe)
        columns = dict(zip(names, zip(*rows, strict=True), strict=False))
        where = self._where(segment)
        for name in VALUE_COLUMNS:
            # a column has one type: its first value tells it. pandas made booleans 0/1 and intervals
            # nanoseconds, silently
            value = next((v for v in columns[name] if v is not None), None)
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str | None):
                raise SourceError(
                    f"{where}: column {name!r} holds {type(value).__name__} values, not numbers",
                    field=name,
                    value=type(value).__name__,
                )
        # objects: pandas made a NULL beside numbers NaN, and the message said open=nan, a value no row holds
        raw = pd.DataFrame({n: pd.Series(columns[n], dtype=object) for n in (key, *VALUE_COLUMNS)})
        when, when_ok = self._when(raw[key], segment)
        values = {n: pd.to_numeric(raw[n], errors="coerce").to_numpy(np.float64) for n in VALUE_COLUMNS}
        bars = Bars(when, when_ok, values, raw)
        cal = get_calendar(self.profile.listing(segment.symbol).exchange)
        verdict = screen(segment, bars, source=where, policy=self.spec.on_bad_rows, cal=cal)
        self.reports.extend(verdict.reports)
        if verdict.rejects:
            self.rejects[segment] = list(verdict.rejects)
        keep = verdict.keep
        return bars_table(segment, when[keep], {k: v[keep] for k, v in values.items()})

    def _when(self, column: pd.Series, segment: Segment) -> tuple[I64, Mask]:
        """Days since 1970-01-01 (daily) or UTC ns (minute), and which rows have one."""
        if segment.timeframe == "1d":
            # a custom query's timestamptz arrives aware in the exchange's zone (``_zone``): its local date
            dates = column.map(lambda w: w.date() if isinstance(w, dt.datetime) else w)
            days = pd.to_datetime(dates, errors="coerce")
            ok = days.notna().to_numpy()
            return np.where(ok, days.to_numpy(dtype="datetime64[D]").astype(np.int64), 0), ok
        zone = dt.UTC if self.tz == "UTC" else zoneinfo.ZoneInfo(self.tz)
        # timestamptz arrives aware; a naive timestamp column is in the configured zone
        utc = [
            # NaT: a NULL beside real times (pandas made the column datetimes), which failed in astimezone
            None
            if w is None or w is pd.NaT
            else (w if w.tzinfo else w.replace(tzinfo=zone)).astimezone(dt.UTC)
            for w in column
        ]
        ts = pd.to_datetime(pd.Series(utc, dtype=object), utc=True, errors="coerce")
        ok = ts.notna().to_numpy()
        return np.where(ok, ts.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype(np.int64), 0), ok


_PLACEHOLDERS = "its values are %(symbol)s, %(start)s and %(end)s, and a literal % is written %%"

# hash_record_extended, which the version query sums, is PostgreSQL 14's.
_VERSION_QUERY_SINCE = 140000


def _version_query_refused(server_version: int) -> SourceError | None:
    """The one line for an upstream server too old for the version query (``server_version`` as libpq gives it:
    130011 is 13.11, 90624 is 9.6.24), else None. Before, the query failed as 'function
    hash_record_extended(record, integer) does not exist' and a hint to add explicit casts, which casts do not
    cure."""
    if server_version >= _VERSION_QUERY_SINCE:
        return None
    major = server_version // 10000
    shown = f"{major}.{server_version % 10000}" if major >= 10 else f"{major}.{server_version // 100 % 100}"
    return SourceError(
        f"source.version_query: the upstream server is PostgreSQL {shown}; the version query needs 14 or later "
        "(hash_record_extended): set source.version_query: false, and bump source.version when upstream rows "
        "change",
        field="source.version_query",
        value=shown,
    )


def _one_line(exc: psycopg.Error) -> str:
    """The server's own message (and hint) without the LINE and caret lines it adds (a bad table was three
    lines), else the client's message on one line (a connection lost mid-fetch)."""
    primary, hint = exc.diag.message_primary, exc.diag.message_hint
    if primary:
        return f"{primary} ({hint})" if hint else primary
    return one_line(exc)


__all__ = ["PostgresSource"]
