"""Validation at the source edge: each bad input of issue 8, built from one clean file, under each policy;
a property test over random frames; the synthetic source checked against the same rules."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresher.calendar import get_calendar
from refresher.profile import Profile
from refresher.segments import Segment
from refresher.sources import make_source
from refresher.sources.files import FilesSource
from refresher.sources.synthetic import SyntheticSource
from refresher.sources.validate import VALUE_COLUMNS, BadRowsError, Bars, find_bad_rows

from .conftest import MakeProfile

NOV = Segment("AAPL", "1d", dt.date(2024, 11, 1))
CLEAN = """\
Ticker,Date,Open,High,Low,Close,Volume
AAPL,2024-11-25,10,11,9,10.5,1000
AAPL,2024-11-26,10.5,12,10,11,2000
AAPL,2024-11-27,11,12,10,11.5,1500
MSFT,2024-11-26,400,410,390,405,300
"""
GOOD_LINE = "AAPL,2024-11-26,10.5,12,10,11,2000"

# (bad line replacing line 3, the column named, the value shown, the rule)
BAD_INPUTS = {
    "high below low": ("AAPL,2024-11-26,10.5,9,10,11,2000", "High", "9", "high >= max(open, close)"),
    "negative volume": ("AAPL,2024-11-26,10.5,12,10,11,-5", "Volume", "-5", "volume >= 0"),
    "volume past bigint": ("AAPL,2024-11-26,10.5,12,10,11,1e20", "Volume", "1e+20", "volume < 2**63"),
    "NaN close": ("AAPL,2024-11-26,10.5,12,10,NaN,2000", "Close", "nan", "close is a finite number"),
    "empty close": ("AAPL,2024-11-26,10.5,12,10,,2000", "Close", "None", "close is a finite number"),
    "text close": ("AAPL,2024-11-26,10.5,12,10,eleven,2000", "Close", "eleven", "close is a finite number"),
    "zero low": ("AAPL,2024-11-26,10.5,12,0,11,2000", "Low", "0", "low > 0"),
    "unparseable date": ("AAPL,2012-1O-15,10.5,12,10,11,2000", "Date", "2012-1O-15", "date parses as a date"),
    "duplicate date": (
        "AAPL,2024-11-26,10.5,12,10,11,2000\nAAPL,2024-11-26,10.6,12,10,11,2100",
        "Date",
        "2024-11-26",
        "(symbol, date) is unique",
    ),
}


def _source(tmp_path: Path, make_profile: MakeProfile, csv: str, policy: str = "fail") -> FilesSource:
    (tmp_path / "bars.csv").write_text(csv)
    profile = make_profile(
        "universe: {symbols: [AAPL, MSFT]}\nstart: 2024-11-01\nend: 2024-11-30\ntimeframes: [1d]\n"
        f"source:\n  kind: files\n  path: {tmp_path}\n  daily: bars.csv\n  on_bad_rows: {policy}\n"
    )
    source = make_source(profile)
    assert isinstance(source, FilesSource)
    return source


def test_clean_file_loads_every_row(tmp_path: Path, make_profile: MakeProfile) -> None:
    source = _source(tmp_path, make_profile, CLEAN)
    table = source.fetch(NOV)
    assert table.column("close").to_pylist() == [10.5, 11.0, 11.5]
    assert source.reports == []


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_fail_names_file_line_column_value_and_rule(
    tmp_path: Path, make_profile: MakeProfile, case: str
) -> None:
    bad, column, value, rule = BAD_INPUTS[case]
    source = _source(tmp_path, make_profile, CLEAN.replace(GOOD_LINE, bad))
    with pytest.raises(BadRowsError) as info:
        source.fetch(NOV)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'bars.csv'}: line 3: {column}=")
    assert value in message and rule in message
    assert info.value.fields["rule"] == rule


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_skip_and_quarantine_load_the_good_rows_and_count_the_bad(
    tmp_path: Path, make_profile: MakeProfile, case: str, policy: str
) -> None:
    bad, column, _, rule = BAD_INPUTS[case]
    source = _source(tmp_path, make_profile, CLEAN.replace(GOOD_LINE, bad), policy)
    table = source.fetch(NOV)
    assert table.column("date").to_pylist() == [dt.date(2024, 11, 25), dt.date(2024, 11, 27)]
    [report] = source.reports
    bad_rows = 2 if case == "duplicate date" else 1
    assert (report.reason, report.rows) == (rule, bad_rows)
    assert report.action == ("quarantined" if policy == "quarantine" else "rejected")
    rejects = source.rejects.get(NOV, [])
    if policy == "skip":
        assert rejects == []
        return
    assert [(r.row, r.rule, r.column) for r in rejects][:1] == [(3, rule, column.lower())]
    assert len(rejects) == bad_rows
    assert rejects[0].to_json()["raw"]["date"] == bad.split(",")[1]


def test_rows_of_other_symbols_are_not_judged(tmp_path: Path, make_profile: MakeProfile) -> None:
    source = _source(tmp_path, make_profile, CLEAN.replace("400,410,390", "400,300,390"))
    assert source.fetch(NOV).num_rows == 3
    with pytest.raises(BadRowsError, match="line 5: High=300"):
        source.fetch(Segment("MSFT", "1d", NOV.month))


def test_off_session_rows_are_dropped_and_reported_under_every_policy(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    saturday = "AAPL,2024-11-30,11,12,10,11,5"
    source = _source(tmp_path, make_profile, CLEAN + saturday + "\n")
    assert source.fetch(NOV).num_rows == 3
    [report] = source.reports
    assert report.action == "dropped" and report.rows == 1 and "2024-11-30" in str(report)


# --- the rules themselves, on random frames ------------------------------------------------------------


@st.composite
def valid_bars(draw: st.DrawFn) -> tuple[Bars, int]:
    n = draw(st.integers(min_value=1, max_value=40))
    price = st.floats(min_value=0.01, max_value=1e6, allow_nan=False)
    opens = np.array(draw(st.lists(price, min_size=n, max_size=n)))
    closes = np.array(draw(st.lists(price, min_size=n, max_size=n)))
    spread = st.floats(min_value=0.0, max_value=0.99)
    up = np.array(draw(st.lists(spread, min_size=n, max_size=n)))
    down = np.array(draw(st.lists(spread, min_size=n, max_size=n)))
    highs = np.maximum(opens, closes) * (1 + up)
    lows = np.minimum(opens, closes) * (1 - down)
    volume = np.array(draw(st.lists(st.integers(0, 10**12), min_size=n, max_size=n)), dtype=np.float64)
    days = np.array(sorted(draw(st.sets(st.integers(10_000, 30_000), min_size=n, max_size=n))), np.int64)
    values = {"open": opens, "high": highs, "low": lows, "close": closes, "volume": volume}
    raw = pd.DataFrame({"date": days, **values})
    return Bars(days, np.ones(n, np.bool_), values, raw), n


@settings(max_examples=200, deadline=None)
@given(valid_bars())
def test_random_valid_frames_pass(drawn: tuple[Bars, int]) -> None:
    bars, _ = drawn
    charged, _ = find_bad_rows(bars, "date")
    assert (charged < 0).all()


CORRUPTIONS = [
    "nan",
    "inf",
    "high_low",
    "high_open",
    "low_close",
    "low_zero",
    "volume",
    "fraction",
    "date",
    "duplicate",
]


@settings(max_examples=300, deadline=None)
@given(valid_bars(), st.data())
def test_any_single_corrupted_cell_is_caught(drawn: tuple[Bars, int], data: st.DataObject) -> None:
    bars, n = drawn
    row = data.draw(st.integers(0, n - 1))
    how = data.draw(st.sampled_from(CORRUPTIONS if n > 1 else CORRUPTIONS[:-1]))
    values = {k: v.copy() for k, v in bars.values.items()}
    when, ok = bars.when.copy(), bars.when_ok.copy()
    o, c = values["open"][row], values["close"][row]
    if how in ("nan", "inf"):
        values[data.draw(st.sampled_from(VALUE_COLUMNS))][row] = np.nan if how == "nan" else np.inf
    elif how == "high_low":
        values["high"][row] = values["low"][row] * 0.5
    elif how == "high_open":
        values["high"][row] = max(o, c) * 0.999
    elif how == "low_close":
        values["low"][row] = min(o, c) * 1.001
    elif how == "low_zero":
        values["low"][row] = data.draw(st.sampled_from([0.0, -1.0]))
    elif how == "volume":
        values["volume"][row] = -1.0
    elif how == "fraction":  # rounded into the bigint column before the rule
        values["volume"][row] += 0.5
    elif how == "date":
        ok[row] = False
    else:
        when[row] = when[(row + 1) % n]
    charged, _ = find_bad_rows(Bars(when, ok, values, bars.raw), "date")
    assert charged[row] >= 0
    others = np.delete(charged, [row, (row + 1) % n] if how == "duplicate" else [row])
    assert (others < 0).all()


def test_ten_million_rows_validate_vectorised() -> None:
    # Not a timing assertion (timings drift on a shared machine): the rules run on 10 M rows at all, in
    # bounded memory, which a per-row loop would not finish in a test's lifetime.
    n = 10_000_000
    rng = np.random.default_rng(1)
    close = rng.uniform(10, 20, n)
    values = {"open": close, "high": close + 1, "low": close - 1, "close": close, "volume": np.ones(n)}
    values["low"][n // 2] = 0.0
    minutes = np.arange(n, dtype=np.int64) * 60_000_000_000  # whole minutes: the stamps of bars
    bars = Bars(minutes, np.ones(n, np.bool_), values, pd.DataFrame())
    charged, rules = find_bad_rows(bars, "ts")
    assert np.flatnonzero(charged >= 0).tolist() == [n // 2]
    assert rules[charged[n // 2]] == ("low > 0", "low")


# --- the synthetic source obeys the rules it is held to ---------------------------------------------------


@pytest.mark.parametrize("timeframe", ["1d", "1m"])
def test_synthetic_bars_pass_validation(make_profile: MakeProfile, timeframe: str) -> None:
    profile: Profile = make_profile(
        'universe: {symbols: [AAPL, "7203"], exchanges: {"7203": XTKS}}\nstart: 2024-01-01\nend: 2024-03-31\n'
    )
    with SyntheticSource(profile) as source:
        for symbol in ("AAPL", "7203"):
            for month in profile.months:
                table = source.fetch(Segment(symbol, timeframe, month))  # type: ignore[arg-type]
                key = "date" if timeframe == "1d" else "ts"
                col = table.column(key)
                when = (
                    col.cast("int32").to_numpy().astype(np.int64)
                    if timeframe == "1d"
                    else col.cast("int64").to_numpy() * 1000
                )
                values = {n: table.column(n).to_numpy().astype(np.float64) for n in VALUE_COLUMNS}
                bars = Bars(when, np.ones(len(when), np.bool_), values, table.to_pandas())
                charged, _ = find_bad_rows(bars, key)  # type: ignore[arg-type]
                assert table.num_rows > 0 and (charged < 0).all()
    assert get_calendar("XTKS").exchange == "XTKS"
