"""Validation at the source edge: every row a source hands over obeys the rules below, or is dealt with.

Rules, checked in this order (a row is charged to the first one it breaks):

- the symbol is spelled as in the universe (a shared file's ``aapl`` row when the universe has ``AAPL``: almost
  surely the user's slip, never silently dropped nor silently taken as ``AAPL``);
- the date / timestamp parses (an unparseable date is a bad row, never a silently dropped one);
- open, high, low, close and volume are finite numbers (no null, NaN or text);
- high >= max(open, close); low <= min(open, close); low > 0; volume >= 0; volume is a whole number (the column
  is a bigint: 100.5 was rounded, a silent change); volume < 2**63 (a bigint);
- (symbol, date) / (symbol, ts) is unique: every row of a repeated key is bad, since we cannot know which
  one is right.

A CSV line with more or fewer cells than its header (``Unsplit``) has no values to check: under ``skip`` and
``quarantine`` it is a bad row of its own, charged before the rules; under ``fail`` the file's reader stops at it.

What happens to bad rows is the profile's ``source.on_bad_rows``: ``fail`` (the default) raises
``BadRowsError`` naming the file, the row, the column, the value and the rule, so nothing of the segment is
loaded; ``skip`` leaves them out and reports them; ``quarantine`` also hands them to the loader, which keeps
them in ``refresher_rejects``. Rows outside the exchange's sessions are not bad data but not ours either: they
are always dropped and reported.

Plain numpy over whole columns (no Python loop per row, no validation library): the rules are a dozen
comparisons, and a library such as pandera would add a dependency and a DataFrame copy for the same masks.
about 9 M rows/s on this 2-core machine (``python -m bench --only bench_validation``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from refresher._lazy import LazyModule
from refresher.calendar import ExchangeCalendar, is_session_day, is_trading_minute
from refresher.errors import SourceError
from refresher.profile import BadRowPolicy
from refresher.schema import SCHEMA_OF
from refresher.segments import Segment
from refresher.sources.base import SourceReport

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")  # imported at the first computation: a no-op refresh validates nothing

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]
VALUE_COLUMNS = ("open", "high", "low", "close", "volume")
_EXAMPLES = 3
_BIGINT_END = float(2**63)
SPELLED_RULE = "symbol is spelled as in the universe (case too)"
WHOLE_MINUTE_RULE = "ts is on a whole minute"
_NS_PER_MINUTE = 60_000_000_000


@dataclass(frozen=True)
class Bars:
    """One segment's rows as a source read them, before validation: parallel columns, one entry per row.

    ``when`` is days since 1970-01-01 (daily) or UTC nanoseconds (minute), meaningful where ``when_ok``;
    ``values`` are open..volume as float64 (NaN where missing or not a number); ``raw`` holds what the
    source had (strings for a CSV), by our column names, for messages and the rejects table; ``rows`` are the
    rows' line numbers in their file, when there is a file.
    """

    when: I64
    when_ok: Mask
    values: Mapping[str, F64]
    raw: pd.DataFrame
    rows: I64 | None = None
    place: str = "line"  # what ``rows`` count: a text file's lines, or (``row``) a Parquet file's rows from 1
    # Which rows name the segment's symbol as the universe spells it, when a source also handed over rows naming it
    # in another case (a shared file's ``aapl``): the others break the symbol rule and are no row of the symbol
    # (not counted as repeating its dates). None: every row is the symbol's. ``raw`` then has the ``symbol`` cells.
    spelled: Mask | None = None

    def __len__(self) -> int:
        return len(self.when)


@dataclass(frozen=True)
class Reject:
    """One quarantined row: which segment and source it came from, where, the rule it broke, its values."""

    segment: Segment
    source: str
    row: int | None
    rule: str
    column: str
    raw: str  # JSON object: the row's values as the source had them

    def to_json(self) -> dict[str, Any]:
        return {
            "segment": str(self.segment),
            "source": self.source,
            "row": self.row,
            "rule": self.rule,
            "column": self.column,
            "raw": json.loads(self.raw),
        }


@dataclass(frozen=True)
class Unsplit:
    """A file's line that does not split into its header's columns (a cut-off volume, a stray comma)."""

    line: int
    text: str
    cells: int
    header: int  # the header's cells

    @property
    def rule(self) -> str:
        return f"the line has the header's {self.header} cells"


class BadRowsError(SourceError):
    """Rows that break a validation rule under ``on_bad_rows: fail``: the first one, in one line."""

    @classmethod
    def first_of(
        cls, segment: Segment, where: str, column: str, value: object, rule: str, count: int
    ) -> BadRowsError:
        return cls(
            f"{where}: {column}={value!r}: breaks the rule {rule} ({segment}: {count} bad row"
            f"{'s' * (count != 1)}; set source.on_bad_rows or --on-bad-rows to skip or quarantine "
            "to load the rest)",
            segment=str(segment),
            field=column,
            value=value,
            rule=rule,
        )


@dataclass(frozen=True)
class Screened:
    """The verdict on a segment's rows: which to keep, and what was left out (reports, quarantined rows)."""

    keep: Mask
    reports: tuple[SourceReport, ...]
    rejects: tuple[Reject, ...]


def _rules(bars: Bars, key: str) -> list[tuple[str, str, Mask]]:
    """(rule, column, mask of rows breaking it), in the order a row is charged."""
    v = bars.values
    o, h, lo, c, vol = (v[name] for name in VALUE_COLUMNS)
    with np.errstate(invalid="ignore"):  # NaN compares False: those rows are charged to "finite" already
        checks: list[tuple[str, str, Mask]] = []
        if bars.spelled is not None:
            checks.append((SPELLED_RULE, "symbol", ~bars.spelled))
        checks.append((f"{key} parses as a {'date' if key == 'date' else 'timestamp'}", key, ~bars.when_ok))
        if (
            key == "ts"
        ):  # 09:30:30 was dropped as "outside trading minutes", inside the session: a bar of what?
            checks.append((WHOLE_MINUTE_RULE, key, bars.when_ok & (bars.when % _NS_PER_MINUTE != 0)))
        checks += [(f"{name} is a finite number", name, ~np.isfinite(v[name])) for name in VALUE_COLUMNS]
        checks += [
            ("high >= max(open, close)", "high", h < np.maximum(o, c)),
            ("low <= min(open, close)", "low", lo > np.minimum(o, c)),
            ("low > 0", "low", lo <= 0),
            ("volume >= 0", "volume", vol < 0),
            # the volume column is a bigint: 100.5 was rounded to 100 (numpy's rint), data silently changed
            ("volume is a whole number", "volume", np.trunc(vol) != vol),
            # the volume column is a bigint: a larger float cast to int64 wraps to -2**63, a silent lie
            ("volume < 2**63", "volume", vol >= _BIGINT_END),
        ]
    checks.append((f"(symbol, {key}) is unique", key, _repeated(bars)))
    return checks


def _repeated(bars: Bars) -> Mask:
    """Rows of the symbol whose (parsed) time occurs more than once in the segment."""
    ours = bars.when_ok if bars.spelled is None else bars.when_ok & bars.spelled
    when = bars.when[ours]
    if len(when) < 2 or bool((when[1:] > when[:-1]).all()):  # sources deliver time order: one pass, no hash
        return np.zeros(len(bars), np.bool_)
    keyed = pd.Series(np.where(ours, bars.when, np.iinfo(np.int64).min))
    return np.asarray(keyed.duplicated(keep=False).to_numpy() & ours, dtype=np.bool_)


def find_bad_rows(
    bars: Bars, key: Literal["date", "ts"]
) -> tuple[npt.NDArray[np.int16], list[tuple[str, str]]]:
    """Per row, the index of the first rule it breaks (-1: none), and the rules as (rule, column)."""
    checks = _rules(bars, key)
    rules = [(rule, column) for rule, column, _ in checks]
    charged = np.full(len(bars), -1, dtype=np.int16)
    if not np.logical_or.reduce([mask for _, _, mask in checks]).any():
        return charged, rules  # the common case: one OR over the masks, no per-rule charging
    for i, (_, _, mask) in enumerate(checks):
        charged[(charged < 0) & mask] = i
    return charged, rules


def screen(
    segment: Segment,
    bars: Bars,
    *,
    source: str,
    policy: BadRowPolicy,
    cal: ExchangeCalendar,
    names: Mapping[str, str] | None = None,
    unsplit: Sequence[Unsplit] = (),
    lines: Callable[[I64], I64] | None = None,
) -> Screened:
    """Apply the rules and the policy to one segment's rows; raises ``BadRowsError`` under ``fail``.

    ``source`` names where the rows came from (a file, ``postgres:table``); ``names`` maps our column names
    to the source's own (``close`` -> ``Adj Close``) so messages speak the user's language. ``unsplit`` are
    the segment's lines left out under ``skip`` or ``quarantine`` because they did not split into columns:
    reported (and quarantined with their text) before the rows that broke a rule. ``lines`` turns ``bars.rows``
    into the file's line numbers, called only when a row is named (it may read the file again).
    """
    key: Literal["date", "ts"] = "date" if segment.timeframe == "1d" else "ts"
    names = names or {}
    charged, rules = find_bad_rows(bars, key)
    bad = charged >= 0
    reports, rejects = _unsplit_verdict(segment, source, policy, unsplit)
    if bad.any():
        positions = np.flatnonzero(bad)
        if lines is not None and bars.rows is not None:
            bars = dataclasses.replace(bars, rows=lines(bars.rows))
        if policy == "fail":
            first = int(positions[0])
            rule, column = rules[int(charged[first])]
            raise BadRowsError.first_of(
                segment,
                _where(source, bars, first, key),
                names.get(column, column),
                _raw_value(bars, first, column),
                rule,
                len(positions),
            )
        action = "quarantined" if policy == "quarantine" else "rejected"
        for i, (rule, _column) in enumerate(rules):
            hit = np.flatnonzero(charged == i)
            if len(hit):
                examples = tuple(_where(source, bars, int(p), key, short=True) for p in hit[:_EXAMPLES])
                reports.append(SourceReport(segment, source, rule, len(hit), examples, action=action))
        if policy == "quarantine":
            records = bars.raw.iloc[positions].astype(str).to_dict("records")
            for p, record in zip(positions.tolist(), records, strict=True):
                rule, column = rules[int(charged[p])]
                row = None if bars.rows is None else int(bars.rows[p])
                rejects.append(Reject(segment, source, row, rule, column, json.dumps(record)))
    on_session = _on_session(segment, bars, cal)
    off = ~bad & ~on_session
    if off.any():
        what = f"not a {cal.exchange} session" if key == "date" else f"outside {cal.exchange} trading minutes"
        examples = tuple(str(bars.raw[key].iloc[int(p)]) for p in np.flatnonzero(off)[:_EXAMPLES])
        reports.append(SourceReport(segment, source, what, int(off.sum()), examples))
    return Screened(~bad & on_session, tuple(reports), tuple(rejects))


def _unsplit_verdict(
    segment: Segment, source: str, policy: BadRowPolicy, unsplit: Sequence[Unsplit]
) -> tuple[list[SourceReport], list[Reject]]:
    """The report, and under ``quarantine`` the rejects (``raw``: the line's text), of lines left out unsplit."""
    reports: list[SourceReport] = []
    rejects: list[Reject] = []
    action = "quarantined" if policy == "quarantine" else "rejected"
    for rule in dict.fromkeys(u.rule for u in unsplit):  # one header per file: one rule, in practice
        lines = [u for u in unsplit if u.rule == rule]
        examples = tuple(f"line {u.line}: {u.cells} cells" for u in lines[:_EXAMPLES])
        reports.append(SourceReport(segment, source, rule, len(lines), examples, action=action))
        if policy == "quarantine":
            rejects += [
                Reject(segment, source, u.line, rule, "line", json.dumps({"line": u.text})) for u in lines
            ]
    return reports, rejects


def bars_table(segment: Segment, when: I64, values: Mapping[str, F64]) -> pa.Table:
    """Validated columns as the segment's Arrow table (``SCHEMA_OF``), sorted by time."""
    order = np.argsort(when, kind="stable")
    if segment.timeframe == "1d":
        when_array = pa.array(when[order].astype(np.int32), pa.date32())
    else:
        when_array = pa.array(when[order] // 1000, pa.timestamp("us", tz="UTC"))
    prices = [pa.array(values[name][order]) for name in ("open", "high", "low", "close")]
    # whole numbers once screened (``volume is a whole number``): rint changes no volume a source hands over
    volume = pa.array(np.rint(values["volume"][order]).astype(np.int64))
    symbols = pa.array(np.full(len(when), segment.symbol, dtype=object), pa.string())
    return pa.Table.from_arrays([symbols, when_array, *prices, volume], schema=SCHEMA_OF[segment.timeframe])


def _on_session(segment: Segment, bars: Bars, cal: ExchangeCalendar) -> Mask:
    when = np.where(bars.when_ok, bars.when, 0)
    inside = is_session_day(cal, when) if segment.timeframe == "1d" else is_trading_minute(cal, when)
    return np.asarray(inside & bars.when_ok, dtype=np.bool_)


def _raw_value(bars: Bars, position: int, column: str) -> object:
    value = bars.raw[column].iloc[position] if column in bars.raw else None
    if isinstance(value, dt.date):  # dates and timestamps as the user writes them, not as Python reprs them
        return value.isoformat()
    return value.item() if isinstance(value, np.generic) else value


def _where(source: str, bars: Bars, position: int, key: str, *, short: bool = False) -> str:
    """A row's place: its line in a file, else its (symbol, date/ts) key as the source had it."""
    if bars.rows is not None:
        ident = f"{bars.place} {int(bars.rows[position])}"
    else:
        ident = f"row {key}={bars.raw[key].iloc[position]}"
    return ident if short else f"{source}: {ident}"


__all__ = [
    "SPELLED_RULE",
    "VALUE_COLUMNS",
    "WHOLE_MINUTE_RULE",
    "BadRowsError",
    "Bars",
    "Reject",
    "Screened",
    "Unsplit",
    "bars_table",
    "find_bad_rows",
    "screen",
]
