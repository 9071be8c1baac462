"""screen() and bars_table() on hand-built rows: the minute path, every report field, exact messages and rejects."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from refresher.calendar import get_calendar
from refresher.schema import SCHEMA_OF
from refresher.segments import Segment
from refresher.sources.base import SourceReport
from refresher.sources.validate import BadRowsError, Bars, Reject, bars_table, find_bad_rows, screen

MINUTES = Segment("AAPL", "1m", dt.date(2024, 11, 1))
DAYS = Segment("AAPL", "1d", dt.date(2024, 11, 1))
NS = 10**9


def ns(text: str) -> int:
    return int(pd.Timestamp(text, tz="UTC").value)


def minute_bars(
    stamps: list[str], *, close: list[float] | None = None, rows: list[int] | None = None
) -> Bars:
    """Valid OHLCV at the given UTC instants (``close`` overrides the closes), as a CSV source would hand them."""
    n = len(stamps)
    closes = np.array(close if close is not None else [10.0] * n)
    values = {
        "open": np.full(n, 10.0),
        "high": np.full(n, 11.0),
        "low": np.full(n, 9.0),
        "close": closes,
        "volume": np.full(n, 100.0),
    }
    raw = pd.DataFrame({"ts": stamps, **{k: v.astype(str) for k, v in values.items()}})
    when = np.array([ns(s) for s in stamps], np.int64)
    return Bars(when, np.ones(n, np.bool_), values, raw, None if rows is None else np.array(rows, np.int64))


OPEN = "2024-11-26 14:30"  # 09:30 in New York: a trading minute
NEXT = "2024-11-26 14:31"
NIGHT = "2024-11-26 03:00"  # New York is closed
HALF = "2024-11-26 14:32:30"  # inside the session, but not a minute boundary


def test_minute_rows_outside_trading_minutes_are_dropped_and_reported() -> None:
    bars = minute_bars([OPEN, NIGHT, NEXT])
    screened = screen(MINUTES, bars, source="bars.csv", policy="fail", cal=get_calendar("XNYS"))
    assert screened.keep.dtype == np.bool_ and screened.keep.tolist() == [True, False, True]
    assert screened.reports == (
        SourceReport(MINUTES, "bars.csv", "outside XNYS trading minutes", 1, (NIGHT,)),
    )
    assert screened.rejects == ()


def test_a_minute_time_not_on_a_whole_minute_is_a_bad_row() -> None:
    # inside the session, it was dropped as "outside XNYS trading minutes", which it is not: a bar of what?
    bars = minute_bars([OPEN, HALF, NEXT], rows=[2, 3, 4])
    with pytest.raises(BadRowsError) as info:
        screen(MINUTES, bars, source="bars.csv", policy="fail", cal=get_calendar("XNYS"))
    assert str(info.value).startswith(
        f"bars.csv: line 3: ts={HALF!r}: breaks the rule ts is on a whole minute (AAPL/1m/2024-11: 1 bad row;"
    ), info.value
    screened = screen(MINUTES, bars, source="bars.csv", policy="skip", cal=get_calendar("XNYS"))
    assert screened.keep.tolist() == [True, False, True]
    assert screened.reports == (
        SourceReport(MINUTES, "bars.csv", "ts is on a whole minute", 1, ("line 3",), action="rejected"),
    )


def test_daily_rows_on_closed_days_are_reported_as_not_sessions() -> None:
    days = np.array([(dt.date(2024, 11, d) - dt.date(1970, 1, 1)).days for d in (26, 28, 30)], np.int64)
    values = {
        k: np.full(3, v)
        for k, v in zip(("open", "high", "low", "close", "volume"), (10, 11, 9, 10, 5), strict=True)
    }
    raw = pd.DataFrame({"date": ["2024-11-26", "2024-11-28", "2024-11-30"]})
    screened = screen(
        DAYS,
        Bars(days, np.ones(3, np.bool_), values, raw),
        source="s",
        policy="fail",
        cal=get_calendar("XNYS"),
    )
    assert screened.keep.tolist() == [True, False, False]
    assert screened.reports == (
        SourceReport(DAYS, "s", "not a XNYS session", 2, ("2024-11-28", "2024-11-30")),
    )


def test_minute_rules_name_the_timestamp() -> None:
    bars = minute_bars([OPEN, OPEN, NEXT])
    bars.when_ok[2] = False
    charged, rules = find_bad_rows(bars, "ts")
    assert charged.dtype == np.int16
    assert [rules[i] for i in charged] == [
        ("(symbol, ts) is unique", "ts"),
        ("(symbol, ts) is unique", "ts"),
        ("ts parses as a timestamp", "ts"),
    ]
    assert rules[0] == ("ts parses as a timestamp", "ts")
    assert find_bad_rows(minute_bars([OPEN]), "ts")[0].tolist() == [-1]


def test_low_above_the_body_is_charged_to_low() -> None:
    bars = minute_bars([OPEN], close=[10.0])
    bars.values["low"][0] = 10.5  # above open and close, below high
    charged, rules = find_bad_rows(bars, "ts")
    assert rules[charged[0]] == ("low <= min(open, close)", "low")


def test_skip_reports_each_rule_with_short_examples_and_keeps_the_rest() -> None:
    bars = minute_bars(
        [OPEN, NEXT, "2024-11-26 14:33", "2024-11-26 14:34", "2024-11-26 14:35"], rows=[2, 3, 4, 5, 6]
    )
    for i in (1, 2, 3, 4):
        bars.values["volume"][i] = -1.0  # four rows break the same rule: three examples shown
    screened = screen(MINUTES, bars, source="bars.csv", policy="skip", cal=get_calendar("XNYS"))
    assert screened.keep.tolist() == [True, False, False, False, False]
    assert screened.reports == (
        SourceReport(
            MINUTES, "bars.csv", "volume >= 0", 4, ("line 3", "line 4", "line 5"), action="rejected"
        ),
    )
    assert screened.rejects == ()


def test_quarantine_keeps_every_bad_row_with_its_place_rule_and_values() -> None:
    bars = minute_bars([OPEN, NEXT], close=[10.0, float("nan")])
    screened = screen(MINUTES, bars, source="postgres:bars", policy="quarantine", cal=get_calendar("XNYS"))
    assert screened.keep.tolist() == [True, False]
    [report] = screened.reports
    assert (report.action, report.examples) == ("quarantined", (f"row ts={NEXT}",))
    [reject] = screened.rejects
    assert reject == Reject(MINUTES, "postgres:bars", None, "close is a finite number", "close", reject.raw)
    assert json.loads(reject.raw) == {
        "ts": NEXT,
        "open": "10.0",
        "high": "11.0",
        "low": "9.0",
        "close": "nan",
        "volume": "100.0",
    }
    assert reject.to_json() == {
        "segment": "AAPL/1m/2024-11",
        "source": "postgres:bars",
        "row": None,
        "rule": "close is a finite number",
        "column": "close",
        "raw": json.loads(reject.raw),
    }


def test_quarantined_rows_carry_their_file_lines() -> None:
    bars = minute_bars([OPEN, NEXT], close=[float("inf"), 10.0], rows=[7, 9])
    [reject] = screen(MINUTES, bars, source="f.csv", policy="quarantine", cal=get_calendar("XNYS")).rejects
    assert reject.row == 7 and isinstance(reject.row, int)


def test_fail_message_without_lines_names_the_row_by_its_key_and_the_users_column() -> None:
    bars = minute_bars([OPEN, NEXT], close=[10.0, float("nan")])
    with pytest.raises(BadRowsError) as info:
        screen(
            MINUTES,
            bars,
            source="postgres:bars",
            policy="fail",
            cal=get_calendar("XNYS"),
            names={"close": "Adj Close"},
        )
    assert str(info.value) == (
        f"postgres:bars: row ts={NEXT}: Adj Close='nan': breaks the rule close is a finite number "
        "(AAPL/1m/2024-11: 1 bad row; set source.on_bad_rows or --on-bad-rows to skip or quarantine to load the rest)"
    )
    assert info.value.fields == {
        "segment": "AAPL/1m/2024-11",
        "field": "Adj Close",
        "value": "nan",
        "rule": "close is a finite number",
    }


def test_fail_message_counts_in_plural() -> None:
    error = BadRowsError.first_of(DAYS, "f.csv: line 3", "High", "9", "high >= max(open, close)", 2)
    assert str(error).endswith(
        "(AAPL/1d/2024-11: 2 bad rows; set source.on_bad_rows or --on-bad-rows to skip or quarantine to load the rest)"
    )


def test_a_missing_column_shows_no_value() -> None:
    bars = minute_bars([OPEN])
    bars.values["open"][0] = float("nan")
    short = Bars(bars.when, bars.when_ok, bars.values, bars.raw.drop(columns=["open"]))
    with pytest.raises(BadRowsError) as info:
        screen(MINUTES, short, source="s", policy="fail", cal=get_calendar("XNYS"))
    assert info.value.fields["value"] is None


def test_minute_table_is_sorted_utc_microseconds() -> None:
    when = np.array([ns(NEXT) + 5_000, ns(OPEN)], np.int64)  # out of order, with sub-microsecond digits
    values = {
        "open": np.array([2.0, 1.0]),
        "high": np.array([2.5, 1.5]),
        "low": np.array([1.5, 0.5]),
        "close": np.array([2.2, 1.2]),
        "volume": np.array([20.4, 10.6]),
    }
    table = bars_table(MINUTES, when, values)
    expected = pa.table(
        {
            "symbol": ["AAPL", "AAPL"],
            "ts": pa.array([ns(OPEN) // 1000, ns(NEXT) // 1000 + 5], pa.timestamp("us", tz="UTC")),
            "open": [1.0, 2.0],
            "high": [1.5, 2.5],
            "low": [0.5, 1.5],
            "close": [1.2, 2.2],
            "volume": pa.array([11, 20], pa.int64()),
        }
    ).cast(SCHEMA_OF["1m"])
    assert table.schema == SCHEMA_OF["1m"]
    assert table.equals(expected)


def test_daily_table_and_a_stable_sort() -> None:
    when = np.array([20_000, 19_999, 20_000], np.int64)
    values = {name: np.array([1.0, 2.0, 3.0]) for name in ("open", "high", "low", "close", "volume")}
    table = bars_table(DAYS, when, values)
    assert table.schema == SCHEMA_OF["1d"]
    epoch = dt.date(1970, 1, 1)
    assert table.column("date").to_pylist() == [
        epoch + dt.timedelta(days=int(d)) for d in (19_999, 20_000, 20_000)
    ]
    assert table.column("open").to_pylist() == [2.0, 1.0, 3.0]  # equal dates keep their order
    assert table.column("symbol").to_pylist() == ["AAPL"] * 3


def test_fail_message_uses_our_column_name_when_the_source_has_no_other() -> None:
    bars = minute_bars([OPEN, NEXT], rows=[2, 3])
    bars.values["high"][1] = 1.0
    with pytest.raises(BadRowsError) as info:
        screen(
            MINUTES, bars, source="f.csv", policy="fail", cal=get_calendar("XNYS"), names={"close": "Close"}
        )
    assert str(info.value).startswith(
        "f.csv: line 3: high='11.0': breaks the rule high >= max(open, close) ("
    )
    assert info.value.fields["field"] == "high"


def test_a_row_is_charged_to_the_first_rule_it_breaks() -> None:
    bars = minute_bars([OPEN, NEXT, "2024-11-26 14:33"], close=[float("nan"), 10.0, float("nan")])
    bars.when_ok[0] = False  # unparseable and a NaN close: the parse rule (0) comes first
    bars.values["volume"][2] = -1.0  # NaN close (rule 5, after the whole-minute rule) before negative volume
    charged, rules = find_bad_rows(bars, "ts")
    assert charged.tolist() == [0, -1, 5]
    assert rules[5] == ("close is a finite number", "close")
