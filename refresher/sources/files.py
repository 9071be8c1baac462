"""Bars from a directory of user files: CSV, gzipped CSV or Parquet, one file per symbol or one for all.

Options (from the profile's ``source:``): ``path`` (the directory), ``daily`` and ``minute`` (file names
relative to it; ``{symbol}`` makes them per-symbol, otherwise the file has a symbol column), ``columns``
(our column -> theirs, matched case-insensitively, e.g. ``{symbol: Ticker, close: Adj Close}``), ``format``
(auto from the extension), ``tz`` (zone of naive minute timestamps; default the listing's exchange) and
``label`` (``right`` if their minute bars are stamped with the interval end).

Rows outside the exchange's sessions are not loaded: they are dropped and described in ``reports``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from refresher.calendar import ExchangeCalendar, get_calendar
from refresher.errors import SourceError
from refresher.profile import Profile
from refresher.schema import SCHEMA_OF, empty_table
from refresher.segments import Segment
from refresher.sources.base import SourceReport, effective_range

# Names tried, in order, when the mapping does not name a column.
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol", "ticker"),
    "date": ("date", "session", "day"),
    "ts": ("ts", "timestamp", "datetime", "time", "date"),
    "open": ("open",),
    "high": ("high",),
    "low": ("low",),
    "close": ("close",),
    "volume": ("volume",),
}
_NS_PER_MIN = 60_000_000_000


def _read(path: Path, fmt: str) -> pa.Table:
    if fmt == "auto":
        fmt = "parquet" if path.suffix in (".parquet", ".pq") else "csv"
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        # pyarrow detects gzip from the .gz suffix; timestamps stay strings so we parse them in one place
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(timestamp_parsers=[]))
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{path}: cannot read as {fmt}: {exc}", file=str(path)) from exc


class FilesSource:
    """Segments cut from user files; see the module docstring for the options."""

    kind = "files"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        opts = profile.source.options
        self.root = Path(str(opts["path"]))
        self.patterns: dict[str, str] = {
            "1d": str(opts.get("daily", "daily/{symbol}.csv")),
            "1m": str(opts.get("minute", "minute/{symbol}.csv")),
        }
        self.columns: Mapping[str, str] = dict(opts.get("columns", {}))
        self.format = str(opts.get("format", "auto"))
        self.tz: str | None = opts.get("tz")
        self.label = str(opts.get("label", "left"))
        self.reports: list[SourceReport] = []
        self._cache: dict[tuple[Path, int, int], pa.Table] = {}

    def file_for(self, segment: Segment) -> Path:
        pattern = self.patterns[segment.timeframe]
        return (
            self.root / pattern.format(symbol=segment.symbol)
            if "{symbol}" in pattern
            else self.root / pattern
        )

    def close(self) -> None:
        """Nothing to release; present so every source can be used the same way (``with`` / ``close``)."""

    def __enter__(self) -> FilesSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self, segment: Segment) -> str:
        path = self.file_for(segment)
        try:
            st = path.stat()
            ident: list[Any] = [str(path), st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            ident = [str(path), "missing"]
        rng = effective_range(self.profile, segment)
        listing = self.profile.listing(segment.symbol)
        blob = json.dumps(
            [
                ident,
                sorted(self.columns.items()),
                self.format,
                self.tz,
                self.label,
                listing.exchange,
                str(rng),
            ]
        )
        return "files/" + hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _load(self, path: Path) -> pa.Table:
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            self._cache = {key: _read(path, self.format)}  # one file at a time: shared files are read once
        return self._cache[key]

    def _column(self, table: pa.Table, path: Path, target: str, required: bool = True) -> str | None:
        by_lower: dict[str, str] = {str(name).lower(): str(name) for name in table.column_names}
        wanted = (self.columns[target],) if target in self.columns else DEFAULT_NAMES[target]
        for name in wanted:
            if name.lower() in by_lower:
                return by_lower[name.lower()]
        if required:
            raise SourceError(
                f"{path}: columns.{target}={wanted[0]!r}: no such column (has: {', '.join(table.column_names)})",
                file=str(path),
                field=f"columns.{target}",
                value=wanted[0],
            )
        return None

    def fetch(self, segment: Segment) -> pa.Table:
        rng = effective_range(self.profile, segment)
        path = self.file_for(segment)
        if rng is None:
            return empty_table(segment.timeframe)
        if not self.root.is_dir():
            raise SourceError(f"source.path={str(self.root)!r}: no such directory", value=str(self.root))
        if not path.is_file():
            self.reports.append(SourceReport(segment, str(path), "not loaded: no such file"))
            return empty_table(segment.timeframe)
        table = self._load(path)
        frame = self._frame(table, path, segment)
        listing = self.profile.listing(segment.symbol)
        cal = get_calendar(listing.exchange)
        if segment.timeframe == "1d":
            frame = self._daily(frame, path, segment, cal, rng)
        else:
            frame = self._minute(frame, path, segment, cal, rng)
        frame = frame.drop_duplicates(subset=["when"], keep="last").sort_values("when")
        return self._to_arrow(frame, segment)

    def _frame(self, table: pa.Table, path: Path, segment: Segment) -> pd.DataFrame:
        when_target = "date" if segment.timeframe == "1d" else "ts"
        names = {t: self._column(table, path, t) for t in ("open", "high", "low", "close", "volume")}
        names["when"] = self._column(table, path, when_target)
        sym_col = self._column(
            table, path, "symbol", required="{symbol}" not in self.patterns[segment.timeframe]
        )
        frame = pd.DataFrame({t: table.column(str(n)).to_pandas() for t, n in names.items()})
        if sym_col is not None:
            frame = frame[table.column(sym_col).to_pandas().astype(str).str.strip() == segment.symbol]
        return frame

    def _report(self, segment: Segment, path: Path, bad: pd.Series, when: pd.Series, why: str) -> None:
        if bad.any():
            examples = tuple(str(w) for w in when[bad].head(3))
            self.reports.append(SourceReport(segment, str(path), why, int(bad.sum()), examples))

    def _daily(
        self,
        frame: pd.DataFrame,
        path: Path,
        segment: Segment,
        cal: ExchangeCalendar,
        rng: tuple[dt.date, dt.date],
    ) -> pd.DataFrame:
        when = pd.to_datetime(frame["when"], errors="coerce")
        if getattr(when.dt, "tz", None) is not None:
            when = when.dt.tz_localize(None)
        days = when.to_numpy(dtype="datetime64[D]").astype(np.int64)
        lo, hi = rng[0].toordinal() - 719163, rng[1].toordinal() - 719163  # days since 1970-01-01
        in_range = pd.Series((days >= lo) & (days <= hi), index=frame.index) & when.notna()
        frame, days, when = frame[in_range], days[in_range.to_numpy()], when[in_range]
        is_session = pd.Series(np.isin(days, cal.sessions), index=frame.index)
        self._report(segment, path, ~is_session, when.dt.date, f"dropped: not a {cal.exchange} session")
        out = frame[is_session].copy()
        out["when"] = when[is_session].dt.date
        return out

    def _minute(
        self,
        frame: pd.DataFrame,
        path: Path,
        segment: Segment,
        cal: ExchangeCalendar,
        rng: tuple[dt.date, dt.date],
    ) -> pd.DataFrame:
        when = pd.to_datetime(frame["when"], errors="coerce")
        if getattr(when.dt, "tz", None) is None:
            when = when.dt.tz_localize(self.tz or cal.tz, ambiguous="NaT", nonexistent="NaT")
        when = when.dt.tz_convert("UTC")
        t = when.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)
        if self.label == "right":
            t = t - _NS_PER_MIN
        parsed = when.notna().to_numpy()
        # a minute row belongs to this segment when its exchange-local date is in the range (no session of
        # ours crosses local midnight); rows of other months are simply not ours, not errors
        local_day = pd.Series(pd.to_datetime(t, utc=True), index=frame.index).dt.tz_convert(cal.tz).dt.date
        in_range = (parsed & local_day.between(rng[0], rng[1]).to_numpy()).astype(bool)
        i = np.clip(np.searchsorted(cal.opens, t, side="right") - 1, 0, len(cal.opens) - 1)
        trading = (
            (t >= cal.opens[i])
            & (t < cal.closes[i])
            & ~((t >= cal.break_starts[i]) & (t < cal.break_ends[i]))
            & (t % _NS_PER_MIN == 0)
        )
        keep = in_range & trading
        bad = pd.Series(in_range & ~trading, index=frame.index)
        self._report(segment, path, bad, when, f"dropped: outside {cal.exchange} trading minutes")
        out: pd.DataFrame = frame[keep].copy()
        out["when"] = t[keep]
        return out

    def _to_arrow(self, frame: pd.DataFrame, segment: Segment) -> pa.Table:
        schema = SCHEMA_OF[segment.timeframe]
        if segment.timeframe == "1d":
            when = pa.array(frame["when"].tolist(), pa.date32())
        else:
            when = pa.array(frame["when"].to_numpy(np.int64) // 1000, pa.timestamp("us", tz="UTC"))
        try:
            prices = [pa.array(frame[c].to_numpy(np.float64)) for c in ("open", "high", "low", "close")]
            volume = pa.array(np.rint(frame["volume"].to_numpy(np.float64)).astype(np.int64))
        except (TypeError, ValueError) as exc:
            raise SourceError(f"{segment}: non-numeric price or volume: {exc}", segment=str(segment)) from exc
        symbols = pa.array([segment.symbol] * len(frame), pa.string())
        return pa.Table.from_arrays([symbols, when, *prices, volume], schema=schema)


__all__ = ["DEFAULT_NAMES", "FilesSource"]
