"""The files source: column mapping, csv / csv.gz / parquet, per-symbol or shared files, bad rows reported."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refresher.errors import SourceError
from refresher.schema import DAILY_SCHEMA, MINUTE_SCHEMA
from refresher.segments import Segment
from refresher.sources import files as files_module
from refresher.sources import make_source
from refresher.sources.files import FilesSource
from tests.refresher.sources.test_bad_rows_cli import BAD, CLEAN

from .conftest import MakeProfile

NOV = dt.date(2024, 11, 1)

DAILY_CSV = """\
Ticker,Date,Open,High,Low,Close,Volume,Adj Close
AAPL,2024-11-26,10,11,9,10.5,1000,10.4
AAPL,2024-11-27,10.5,12,10,11,2000.0,10.9
AAPL,2024-11-28,11,12,10,11,5,11
AAPL,2024-11-30,11,12,10,11,5,11
MSFT,2024-11-27,400,410,390,405,300,405
AAPL,2024-10-31,9,10,8,9,100,9
"""


def profile_body(source: str) -> str:
    return f"""\
universe: {{symbols: [AAPL, MSFT, "7203"], exchanges: {{"7203": XTKS}}}}
start: 2024-10-01
end: 2024-11-30
source:
{source}
"""


def test_single_csv_with_mapping_reports_non_sessions(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "all.csv").write_text(DAILY_CSV)
    src = FilesSource(
        make_profile(
            profile_body(
                f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  columns: {{close: Adj Close}}"
            )
        )
    )
    assert isinstance(src, FilesSource)
    table = src.fetch(Segment("AAPL", "1d", NOV))
    assert table.schema.equals(DAILY_SCHEMA)
    df = table.to_pandas()
    assert list(df["date"]) == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
    assert list(df["close"]) == [10.4, 10.9]  # the mapping picked Adj Close
    assert list(df["volume"]) == [1000, 2000]
    [report] = src.reports
    assert report.rows == 2 and "2024-11-28" in str(report) and "session" in report.reason
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 1
    assert src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 1


def minute_rows(symbol: str, local: list[str], tz: str) -> pd.DataFrame:
    ts = pd.to_datetime(local).tz_localize(tz)
    n = len(ts)
    return pd.DataFrame(
        {
            "SYMBOL": symbol,
            "Timestamp": ts.tz_convert("UTC"),
            "o": [100.0] * n,
            "h": [101.0] * n,
            "l": [99.0] * n,
            "c": [100.5] * n,
            "v": [10] * n,
        }
    )


def test_per_symbol_parquet_minutes_with_tokyo_lunch(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "minute").mkdir()
    rows = minute_rows(
        "7203",
        [
            "2024-11-05 09:00",
            "2024-11-05 11:29",
            "2024-11-05 11:45",
            "2024-11-05 15:29",
            "2024-11-05 15:30",
            "2024-11-04 10:00",
        ],
        "Asia/Tokyo",
    )
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "minute" / "7203.parquet")
    body = f"  kind: files\n  path: {tmp_path}\n  minute: 'minute/{{symbol}}.parquet'\n  columns: {{open: o, high: h, low: l, close: c, volume: v}}"
    src = FilesSource(make_profile(profile_body(body)))
    table = src.fetch(Segment("7203", "1m", NOV))
    assert table.schema.equals(MINUTE_SCHEMA)
    local = table.to_pandas()["ts"].dt.tz_convert("Asia/Tokyo").dt.strftime("%d %H:%M").tolist()
    assert local == ["05 09:00", "05 11:29", "05 15:29"]
    [report] = src.reports  # lunch break, after the 15:30 close, and a holiday (Culture Day observed)
    assert report.rows == 3


def test_csv_gz_naive_local_times_right_labelled(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "m").mkdir()
    text = "symbol,datetime,open,high,low,close,volume\nAAPL,2024-11-29 09:31:00,1,2,0.5,1.5,7\nAAPL,2024-11-29 13:00:00,1,2,0.5,1.5,7\nAAPL,2024-11-29 13:05:00,1,2,0.5,1.5,7\n"
    with gzip.open(tmp_path / "m" / "AAPL.csv.gz", "wt") as fh:
        fh.write(text)
    body = f"  kind: files\n  path: {tmp_path}\n  minute: 'm/{{symbol}}.csv.gz'\n  label: right"
    src = FilesSource(make_profile(profile_body(body)))
    df = src.fetch(Segment("AAPL", "1m", NOV)).to_pandas()
    # right-labelled 09:31 covers 09:30-09:31 -> our left label 09:30; 13:00 is the last bar of the early close
    local = df["ts"].dt.tz_convert("America/New_York").dt.strftime("%H:%M").tolist()
    assert local == ["09:30", "12:59"]
    assert [r.rows for r in src.reports] == [1]


def test_version_tracks_file_changes(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "daily").mkdir()
    f = tmp_path / "daily" / "AAPL.csv"
    f.write_text(DAILY_CSV)
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}")))
    seg = Segment("AAPL", "1d", NOV)
    v1 = src.version(seg)
    assert src.version(seg) == v1
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert src.version(seg) != v1
    remapped = make_source(
        make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  columns: {{close: Adj Close}}"))
    )
    assert remapped.version(seg) != src.version(seg)


def test_missing_file_is_reported_and_empty(tmp_path: Path, make_profile: MakeProfile) -> None:
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}")))
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 0
    assert "no such file" in str(src.reports[0])


def test_missing_column_names_file_field_value(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "all.csv").write_text(DAILY_CSV)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  columns: {{volume: Vol}}"
    src = FilesSource(make_profile(profile_body(body)))
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert "all.csv" in str(info.value) and "columns.volume" in str(info.value) and "Vol" in str(info.value)


def test_yyyymmdd_numbers_are_dates(tmp_path: Path, make_profile: MakeProfile) -> None:
    # read as numbers, pandas took 20241126 for nanoseconds after 1970: every row fell outside the
    # profile's months and the segment loaded empty without a word
    (tmp_path / "all.csv").write_text(DAILY_CSV.replace("2024-11-", "202411").replace("2024-10-", "202410"))
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.csv")))
    dates = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]


def test_epoch_seconds_fail_the_timestamp_rule_showing_the_value(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    (tmp_path / "m.csv").write_text("symbol,ts,open,high,low,close,volume\nAAPL,1732631400,1,2,0.5,1.5,7\n")
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  minute: m.csv")))
    with pytest.raises(SourceError, match=r"m\.csv: line 2: ts=1732631400: breaks the rule ts parses"):
        src.fetch(Segment("AAPL", "1m", dt.date(2024, 10, 1)))


def test_a_symbol_absent_from_a_shared_file_is_reported(tmp_path: Path, make_profile: MakeProfile) -> None:
    # (a row naming it in another case, aapl, is its bad row: test_files_policies)
    (tmp_path / "all.csv").write_text(DAILY_CSV.replace("AAPL,", "AAPL.O,"))
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.csv")))
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 0
    [report] = src.reports
    assert "no row has Ticker='AAPL' (it has e.g. 'AAPL.O', 'MSFT')" in str(report)
    src.reports.clear()
    assert src.fetch(Segment("MSFT", "1d", dt.date(2024, 10, 1))).num_rows == 0  # in the file, not this month
    assert src.reports == []


def test_daily_times_with_offsets_keep_the_dates_the_file_wrote(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # pyarrow read '2024-11-26T00:00:00+09:00' as 2024-11-25 15:00 UTC: every Tokyo bar loaded a day early
    (tmp_path / "all.csv").write_text(
        "Ticker,Date,Open,High,Low,Close,Volume\n"
        "7203,2024-11-26T00:00:00+09:00,10,11,9,10.5,1000\n"
        "7203,2024-11-27T00:00:00+09:00,10,11,9,10.5,1000\n"
        "AAPL,2024-11-26T23:00:00-05:00,10,11,9,10.5,1000\n"
        "AAPL,2024-11-27T04:00:00Z,10,11,9,10.5,1000\n"
    )
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.csv")))
    tokyo = src.fetch(Segment("7203", "1d", NOV)).column("date").to_pylist()
    assert tokyo == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
    new_york = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert new_york == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]  # the same instant, two written dates


def test_a_file_written_to_while_it_is_read_is_refused_not_loaded_cut(
    tmp_path: Path, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An export still appending: the read saw "...,10" of a close of 10.9 and loaded it as a whole row.
    path = tmp_path / "all.csv"
    path.write_text("\n".join(DAILY_CSV.splitlines()[:3])[:-2])
    read = files_module._read

    def read_then_the_export_goes_on(file: Path, fmt: str, *, leave_out: bool) -> files_module._Read:
        done = read(file, fmt, leave_out=leave_out)
        with file.open("a") as out:
            out.write(".9\n")  # the cut row's end
        return done

    monkeypatch.setattr(files_module, "_read", read_then_the_export_goes_on)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  columns: {{close: Adj Close}}"
    src = FilesSource(make_profile(profile_body(body)))
    with pytest.raises(
        SourceError, match=r"all\.csv: changed while it was read; run again once it is written"
    ):
        src.fetch(Segment("AAPL", "1d", NOV))
    monkeypatch.undo()
    assert src.fetch(Segment("AAPL", "1d", NOV)).column("close").to_pylist() == [10.4, 10.9]


@pytest.mark.parametrize("second", ["close", "Close"])
def test_two_columns_matching_one_name_are_refused_unless_the_mapping_spells_one(
    tmp_path: Path, make_profile: MakeProfile, second: str
) -> None:
    # 'Close' beside 'close': the last one was loaded silently; two named 'Close': a KeyError traceback
    (tmp_path / "all.csv").write_text(
        f"Ticker,Date,Open,High,Low,Close,Volume,{second}\nAAPL,2024-11-26,10,11,9,10.5,1000,10.4\n"
    )
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.csv")))
    with pytest.raises(SourceError, match=rf"columns.close='close': 2 columns match \('Close', '{second}'\)"):
        src.fetch(Segment("AAPL", "1d", NOV))
    if second == "close":
        body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  columns: {{close: Close}}"
        mapped = FilesSource(make_profile(profile_body(body)))
        assert mapped.fetch(Segment("AAPL", "1d", NOV)).column("close").to_pylist() == [10.5]


def test_a_symbol_column_that_is_not_text_is_one_line(tmp_path: Path, make_profile: MakeProfile) -> None:
    table = pa.table(
        {
            "Ticker": pa.array([{"id": "AAPL"}]),  # an ArrowNotImplementedError traceback before
            "Date": [dt.date(2024, 11, 26)],
            **{name: [10.0] for name in ("Open", "High", "Low", "Close", "Volume")},
        }
    )
    pq.write_table(table, tmp_path / "all.parquet")
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.parquet")))
    with pytest.raises(SourceError, match=r"all\.parquet: columns.symbol='Ticker': holds struct<id: string>"):
        src.fetch(Segment("AAPL", "1d", NOV))


def test_an_unknown_time_zone_is_refused_before_anything_is_read(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # found at the first minute segment before: a ZoneInfoNotFoundError traceback in the middle of a refresh
    with pytest.raises(SourceError, match=r"^source.tz='Mars/Base': unknown time zone"):
        FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  tz: Mars/Base")))
    FilesSource(
        make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  tz: '+09:00'"))
    )  # as pandas takes it


@pytest.mark.parametrize("naive_first", [True, False])
def test_minute_times_with_and_without_an_offset_are_one_line(
    tmp_path: Path, make_profile: MakeProfile, naive_first: bool
) -> None:
    # pandas parsed the kind of the first time and made the other NaT: "ts=...-05:00: breaks the rule ts parses"
    rows = ["AAPL,2024-11-29 09:31:00,1,2,0.5,1.5,7", "AAPL,2024-11-29T09:32:00-05:00,1,2,0.5,1.5,7"]
    rows = rows if naive_first else rows[::-1]
    (tmp_path / "m.csv").write_text("\n".join(["symbol,Time,open,high,low,close,volume", *rows]) + "\n")
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  minute: m.csv")))
    with pytest.raises(SourceError) as caught:
        src.fetch(Segment("AAPL", "1m", NOV))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{tmp_path / 'm.csv'}: columns.ts='Time': mixes times with and without a UTC offset"
    )
    assert "'2024-11-29T09:32:00-05:00'" in message and "'2024-11-29 09:31:00'" in message


def test_minute_text_times_whose_offsets_differ_are_each_their_instant(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # text pyarrow leaves as text (a space before the offset), across the DST change: pandas raised 'Mixed
    # timezones detected', a traceback ('garbage' keeps the column text whatever pyarrow would make of it)
    (tmp_path / "m.csv").write_text(
        "symbol,ts,open,high,low,close,volume\n"
        "AAPL,2024-11-01 09:30:00 -04:00,1,2,0.5,1.5,7\n"
        "AAPL,2024-11-04 09:30:00 -05:00,1,2,0.5,1.5,7\n"
        "AAPL,garbage,1,2,0.5,1.5,7\n"
    )
    body = f"  kind: files\n  path: {tmp_path}\n  minute: m.csv\n  on_bad_rows: skip"
    src = FilesSource(make_profile(profile_body(body)))
    ts = src.fetch(Segment("AAPL", "1m", NOV)).column("ts").to_pylist()
    assert [t.astimezone(dt.UTC).strftime("%d %H:%M") for t in ts] == ["01 13:30", "04 14:30"]


@pytest.mark.parametrize(
    ("volume", "kind"),
    [
        (pa.array([True]), "bool"),
        (pa.array([dt.timedelta(seconds=5)], pa.duration("s")), "duration[s]"),
        (pa.array([dt.date(2024, 11, 26)]), "date32[day]"),
        (pa.array([b"7"]), "binary"),
    ],
)
def test_a_value_column_that_is_not_numbers_is_one_line(
    tmp_path: Path, make_profile: MakeProfile, volume: pa.Array, kind: str
) -> None:
    # pandas turned True into a volume of 1 and 5 s into 5e9, loaded silently
    table = pa.table(
        {
            "Ticker": ["AAPL"],
            "Date": [dt.date(2024, 11, 26)],
            **{name: [10.0] for name in ("Open", "High", "Low", "Close")},
            "Volume": volume,
        }
    )
    pq.write_table(table, tmp_path / "all.parquet")
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.parquet")))
    with pytest.raises(SourceError) as caught:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert (
        str(caught.value) == f"{tmp_path / 'all.parquet'}: columns.volume='Volume': holds {kind}, not numbers"
    )


def test_value_columns_of_numbers_of_any_width_and_text_load(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    table = pa.table(
        {
            "Ticker": pa.array(["AAPL"]).dictionary_encode(),
            "Date": [dt.date(2024, 11, 26)],
            "Open": pa.array([10], pa.int16()),
            "High": pa.array([11.0], pa.float32()),
            "Low": pa.array(["9"], pa.large_string()),
            "Close": pa.array([10], pa.decimal128(5, 2)),
            "Volume": pa.array([7], pa.uint32()).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "all.parquet")
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.parquet")))
    row = src.fetch(Segment("AAPL", "1d", NOV)).to_pylist()[0]
    assert (row["open"], row["high"], row["low"], row["close"], row["volume"]) == (10, 11, 9, 10, 7)


def test_yyyymmdd_numbers_beside_an_empty_date_or_as_floats_are_dates(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # An empty date cell makes the CSV reader's integer column floats (pandas: object with None); a Parquet
    # writer may store the numbers as doubles. pandas took 20241126(.0) for nanoseconds after 1970 again: the
    # row fell outside every month and vanished without a word, while under skip the empty one was reported.
    csv = DAILY_CSV.replace("2024-11-", "202411").replace("2024-10-", "202410")
    (tmp_path / "all.csv").write_text(csv + "AAPL,,1,2,0.5,1.5,7,1.5\n")
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  on_bad_rows: skip"
    src = FilesSource(make_profile(profile_body(body)))
    dates = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
    october = src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1)))
    assert october.column("date").to_pylist() == [dt.date(2024, 10, 31)]
    # the empty date is the one bad row (beside the days that are no session, as before)
    [empty] = [report for report in src.reports if report.reason == "date parses as a date"]
    assert empty.examples == ("line 8",)

    table = pa.table(
        {
            "symbol": ["AAPL", "AAPL", "AAPL"],
            "date": [20241126.0, 20241127.0, 20241127.5],
            "open": [10.0, 10.5, 10.0],
            "high": [11.0, 12.0, 11.0],
            "low": [9.0, 10.0, 9.0],
            "close": [10.5, 11.0, 10.5],
            "volume": [1000, 2000, 5],
        }
    )
    pq.write_table(table, tmp_path / "all.parquet")
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.parquet\n  on_bad_rows: skip"
    src = FilesSource(make_profile(profile_body(body), name="parquet"))
    dates = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
    src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1)))
    [half] = src.reports  # 20241127.5 is no date: a bad row, never a day
    assert half.reason == "date parses as a date" and half.examples == (
        "row 3",
    )  # a Parquet file has no lines


def test_a_symbol_file_named_in_another_case_is_one_line(tmp_path: Path, make_profile: MakeProfile) -> None:
    # aapl.csv for AAPL loaded an empty segment, reported only as 'no such file' beside the file the user sees
    (tmp_path / "aapl.csv").write_text("Date,Open,High,Low,Close,Volume\n2024-11-26,10,11,9,10.5,1000\n")
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'"
    src = FilesSource(make_profile(profile_body(body)))
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        f"{tmp_path / 'AAPL.csv'}: no such file for AAPL, but aapl.csv is there (source.daily='{{symbol}}.csv'; "
        "file names are case-sensitive): rename it to AAPL.csv"
    )
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 0  # no file in any case: reported, as before
    assert [report.reason for report in src.reports] == ["no such file"]


def test_a_file_with_a_header_alone_is_reported(tmp_path: Path, make_profile: MakeProfile) -> None:
    # an export that wrote its header (or a Parquet schema) and nothing else loaded an empty segment without a
    # word, where a missing file is reported
    (tmp_path / "AAPL.csv").write_text("Date,Open,High,Low,Close,Volume\r\n")
    empty = pa.table(
        {name: pa.array([], pa.float64()) for name in ("open", "high", "low", "close", "volume")}
    )
    pq.write_table(
        empty.append_column("ts", pa.array([], pa.timestamp("us", tz="UTC"))), tmp_path / "AAPL.pq"
    )
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'\n  minute: '{{symbol}}.pq'"
    src = FilesSource(make_profile(profile_body(body)))
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 0
    assert src.fetch(Segment("AAPL", "1m", NOV)).num_rows == 0
    assert [str(report) for report in src.reports] == [
        f"AAPL/{timeframe}/2024-11: {tmp_path / name}: 0 rows dropped: the file has no rows (a header alone)"
        for timeframe, name in (("1d", "AAPL.csv"), ("1m", "AAPL.pq"))
    ]


def symbol_file(tmp_path: Path, make_profile: MakeProfile, name: str, raw: bytes, policy: str) -> FilesSource:
    """A files source of one per-symbol file, ``name`` (gzipped when it ends in .gz), holding ``raw``."""
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}{name[4:]}'\n  on_bad_rows: {policy}"
    return FilesSource(make_profile(profile_body(body)))


@pytest.mark.parametrize("name", ["AAPL.csv", "AAPL.csv.gz"])
def test_a_line_with_more_or_fewer_cells_than_the_header_is_named_by_its_number(
    tmp_path: Path, make_profile: MakeProfile, name: str
) -> None:
    # pyarrow's 'CSV parse error: Expected 6 columns, got 5: 2024-11-27,...' named the file and the text but not
    # the line, in a file of thousands of lines (a volume cut off, a stray comma)
    raw = b"Date,Open,High,Low,Close,Volume\n2024-11-26,10,11,9,10.5,1000\n2024-11-27,10,11,9,10.5\n"
    raw += b"2024-11-29,10,11,9,10.5,1000\n2024-11-29,10,11,9,10.5,1000,7\n"
    src = symbol_file(tmp_path, make_profile, name, raw, "fail")
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value).startswith(
        f"{tmp_path / name}: line 3='2024-11-27,10,11,9,10.5': 5 cells where the header has 6; "
    ), info.value
    assert "--on-bad-rows to skip or quarantine" in str(info.value)
    assert info.value.fields["field"] == "line 3"


WIDTH = "the line has the header's 6 cells"


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
@pytest.mark.parametrize("name", ["AAPL.csv", "AAPL.csv.gz"])
def test_under_skip_or_quarantine_a_line_with_more_or_fewer_cells_is_a_bad_row(
    tmp_path: Path, make_profile: MakeProfile, policy: str, name: str
) -> None:
    # it stopped the refresh whatever on_bad_rows said (056949e named it); rows after it keep their line numbers
    raw = b"Date,Open,High,Low,Close,Volume\n2024-11-26,10,11,9,10.5,1000\n2024-11-27,10,11,9,10.5\n"
    raw += b"2024-11-27,10,11,9,10.5,1000,7\n2024-11-29,10,11,9,10.5,-5\n2024-11-27,10,11,9,10.5,2000\n"
    src = symbol_file(tmp_path, make_profile, name, raw, policy)
    nov = src.fetch(Segment("AAPL", "1d", NOV)).to_pydict()
    assert (nov["date"], nov["volume"]) == ([dt.date(2024, 11, 26), dt.date(2024, 11, 27)], [1000, 2000])
    # a line split into no columns has no date: it is charged to the symbol's first segment
    assert src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 0
    action = "quarantined" if policy == "quarantine" else "rejected"
    path = tmp_path / name
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 1 rows {action}: volume >= 0 (e.g. line 5)",
        f"AAPL/1d/2024-10: {path}: 2 rows {action}: {WIDTH} (e.g. line 3: 5 cells, line 4: 7 cells)",
    ]
    rejects = [(str(r.segment), r.row, r.rule, r.column, r.raw) for rs in src.rejects.values() for r in rs]
    assert rejects == (
        []
        if policy == "skip"
        else [
            ("AAPL/1d/2024-11", 5, "volume >= 0", "volume", rejects[0][4]),
            ("AAPL/1d/2024-10", 3, WIDTH, "line", '{"line": "2024-11-27,10,11,9,10.5"}'),
            ("AAPL/1d/2024-10", 4, WIDTH, "line", '{"line": "2024-11-27,10,11,9,10.5,1000,7"}'),
        ]
    )


def test_a_line_with_more_or_fewer_cells_in_a_shared_file_is_its_symbols(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # the symbol cell is read as the CSV reader splits the line: a quoted comma before it is no separator
    (tmp_path / "all.csv").write_text(
        "Name,Ticker,Date,Open,High,Low,Close,Volume\n"
        '"Apple, Inc.",AAPL,2024-11-26,10,11,9,10.5,1000\n'
        '"Microsoft, Corp.",MSFT,2024-11-27,400,410,390,405,300,9\n'
        '"Microsoft, Corp.",MSFT,2024-11-26,400,410,390,405,300\n'
        '"Apple, Inc."\n'
        '"Alphabet, Inc.",GOOG,2024-11-26,10,11,9,10.5\n'
        '"Apple, Inc.",AAPL,2024-11-27,10,11,9,10.5,1000\n'
    )
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  on_bad_rows: skip"
    src = FilesSource(make_profile(profile_body(body)))
    for symbol, rows in (("AAPL", 2), ("MSFT", 1)):
        assert src.fetch(Segment(symbol, "1d", NOV)).num_rows == rows
        assert src.fetch(Segment(symbol, "1d", dt.date(2024, 10, 1))).num_rows == 0
    # a line cut before its symbol cell, or of a symbol not in the profile: the profile's first symbol's
    path = tmp_path / "all.csv"
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-10: {path}: 2 rows rejected: the line has the header's 8 cells (e.g. line 5: 1 cells, "
        "line 6: 7 cells)",
        f"MSFT/1d/2024-10: {path}: 1 rows rejected: the line has the header's 8 cells (e.g. line 3: 9 cells)",
    ]


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
def test_a_line_with_more_or_fewer_cells_naming_its_symbol_in_another_case_is_that_symbols(
    tmp_path: Path, make_profile: MakeProfile, policy: str
) -> None:
    # msft's line was charged to the profile's first symbol (AAPL's report, AAPL's quarantined rows), as a line of
    # a symbol outside the universe is; its rows that split are MSFT's bad rows
    (tmp_path / "all.csv").write_text(
        "Ticker,Date,Open,High,Low,Close,Volume\n"
        "AAPL,2024-11-26,10,11,9,10.5,1000\n"
        "MSFT,2024-11-26,400,410,390,405,300\n"
        " msft ,2024-11-27,400,410,390,405,300,9\n"
    )
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  on_bad_rows: {policy}"
    src = FilesSource(make_profile(profile_body(body)))
    for symbol in ("AAPL", "MSFT"):
        assert src.fetch(Segment(symbol, "1d", NOV)).num_rows == 1
        assert src.fetch(Segment(symbol, "1d", dt.date(2024, 10, 1))).num_rows == 0
    action = "quarantined" if policy == "quarantine" else "rejected"
    assert [str(report) for report in src.reports] == [
        f"MSFT/1d/2024-10: {tmp_path / 'all.csv'}: 1 rows {action}: the line has the header's 7 cells (e.g. line 4: "
        "8 cells)"
    ]
    rejects = [(str(r.segment), r.row, r.rule) for rs in src.rejects.values() for r in rs]
    assert rejects == (
        [] if policy == "skip" else [("MSFT/1d/2024-10", 4, "the line has the header's 7 cells")]
    )


def test_a_shared_files_lines_with_more_or_fewer_cells_are_split_once_per_read(
    tmp_path: Path, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each was split again for every symbol's first segment: 500 symbols x 10,000 such lines took 40 minutes
    symbols = ["AAPL", "MSFT"]
    good = "".join(f"{s},2024-11-26,10,11,9,10.5,1000\n" for s in symbols)
    bad = "".join(f"{s},2024-11-27,10,11,9,10.5,1000,{n}\n" for n in range(3) for s in symbols)
    (tmp_path / "all.csv").write_text("Ticker,Date,Open,High,Low,Close,Volume\n" + good + bad)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  on_bad_rows: skip"
    src = FilesSource(make_profile(profile_body(body)))
    split = files_module._cells
    calls: list[str] = []
    monkeypatch.setattr(files_module, "_cells", lambda text, count: calls.append(text) or split(text, count))
    for symbol in symbols:
        assert src.fetch(Segment(symbol, "1d", dt.date(2024, 10, 1))).num_rows == 0
        assert src.fetch(Segment(symbol, "1d", NOV)).num_rows == 1
    assert sorted(calls) == sorted(bad.splitlines())
    assert [(report.segment.symbol, report.rows) for report in src.reports] == [(s, 3) for s in symbols]


def test_a_csv_whose_every_line_has_more_or_fewer_cells_is_no_header_alone(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    raw = b"Date,Open,High,Low,Close,Volume\n2024-11-26,10,11,9,10.5\n2024-11-27,1\n"
    src = symbol_file(tmp_path, make_profile, "AAPL.csv", raw, "skip")
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 0
    assert src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 0
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-10: {tmp_path / 'AAPL.csv'}: 2 rows rejected: {WIDTH} (e.g. line 2: 5 cells, line 3: 2 cells)"
    ]


CUT = 10  # an October AAPL line of test_bad_rows_cli's file, before each of its bad rows
assert CLEAN[CUT - 1].startswith("AAPL,2024-10")


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_line_with_more_or_fewer_cells_leaves_other_bad_rows_as_they_were(
    tmp_path: Path, make_profile: MakeProfile, case: str
) -> None:
    lines = BAD[case][0]
    body = f"  kind: files\n  path: {tmp_path}\n  daily: bars.csv\n  columns: {{symbol: Ticker}}\n  on_bad_rows: quarantine"
    profile = make_profile(profile_body(body))
    segments = [Segment(s, "1d", m) for s in ("AAPL", "MSFT") for m in profile.months]

    def fetched(lines: list[str]) -> tuple[list[str], list[tuple[str, int | None, str, str, str]]]:
        (tmp_path / "bars.csv").write_text("\n".join(lines) + "\n")
        src = FilesSource(profile)
        for segment in segments:
            src.fetch(segment)
        rejects = [
            (str(r.segment), r.row, r.rule, r.column, r.raw) for rs in src.rejects.values() for r in rs
        ]
        return [str(report) for report in src.reports], rejects

    reports, rejects = fetched(lines)
    cut = lines[CUT - 1].rsplit(",", 1)[0]  # an October AAPL line before the bad row, its volume cut off
    with_cut, rejects_with_cut = fetched([*lines[: CUT - 1], cut, *lines[CUT:]])
    path = tmp_path / "bars.csv"
    width = f"AAPL/1d/2024-10: {path}: 1 rows quarantined: the line has the header's 7 cells (e.g. line {CUT}: 6 cells)"
    assert sorted(with_cut) == sorted([*reports, width])
    assert sorted(rejects_with_cut) == sorted(
        [
            *rejects,
            ("AAPL/1d/2024-10", CUT, "the line has the header's 7 cells", "line", json.dumps({"line": cut})),
        ]
    )


def test_a_line_left_out_unsplit_is_left_out_of_the_dates_read_as_written(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # zoned daily times are read a second time as text (d9960be): that read leaves out the same line
    raw = b"Date,Open,High,Low,Close,Volume\n2024-11-26T00:00:00+09:00,10,11,9,10.5,1000\n"
    raw += b"2024-11-27T00:00:00+09:00,10,11,9\n2024-11-28T00:00:00+09:00,10,11,9,10.5,2000\n"
    src = symbol_file(tmp_path, make_profile, "7203.csv", raw, "skip")
    table = src.fetch(Segment("7203", "1d", NOV)).to_pydict()
    assert (table["date"], table["volume"]) == ([dt.date(2024, 11, 26), dt.date(2024, 11, 28)], [1000, 2000])


@pytest.mark.parametrize("timeframe", ["1d", "1m"])
def test_dates_written_day_first_are_all_read_day_first(
    tmp_path: Path, make_profile: MakeProfile, timeframe: str
) -> None:
    # pandas took the order of the first: '04/11/2024' was April 11 (left out unreported), '26/11/2024' a bad row
    time = " 10:00" if timeframe == "1m" else ""
    raw = f"Date,Open,High,Low,Close,Volume\n04/11/2024{time},10,11,9,10.5,1000\n26/11/2024{time},10,11,9,10.5,1000\n"
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'\n  minute: '{{symbol}}.csv'"
    (tmp_path / "AAPL.csv").write_text(raw)
    src = FilesSource(make_profile(profile_body(body)))
    table = src.fetch(Segment("AAPL", timeframe, NOV))
    column = table.column("date" if timeframe == "1d" else "ts").to_pylist()
    if timeframe == "1d":
        assert column == [dt.date(2024, 11, 4), dt.date(2024, 11, 26)]
    else:
        assert [t.date() for t in column] == [dt.date(2024, 11, 4), dt.date(2024, 11, 26)]
    assert src.reports == []


def test_dates_written_day_first_and_month_first_are_one_line(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    raw = "Date,Open,High,Low,Close,Volume\n26/11/2024,10,11,9,10.5,1000\n11/27/2024,10,11,9,10.5,1000\n"
    (tmp_path / "AAPL.csv").write_text(raw)
    src = FilesSource(
        make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'"))
    )
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        f"{tmp_path / 'AAPL.csv'}: columns.date='Date': mixes dates with the day first and the month first "
        "(e.g. '26/11/2024' and '11/27/2024'); write them in one order, ideally as YYYY-MM-DD"
    )


def test_a_shared_files_day_first_dates_are_day_first_for_every_symbol(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # decided per symbol, MSFT's days (all 12 or less) were read month first: April 11 and May 11, left out
    raw = "Ticker,Date,Open,High,Low,Close,Volume\nAAPL,26/11/2024,10,11,9,10.5,1000\n"
    raw += "MSFT,04/11/2024,10,11,9,10.5,1000\nMSFT,05/11/2024,10,11,9,10.5,1000\n"
    (tmp_path / "all.csv").write_text(raw)
    src = FilesSource(make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: all.csv")))
    dates = src.fetch(Segment("MSFT", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, 4), dt.date(2024, 11, 5)]
    assert src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist() == [dt.date(2024, 11, 26)]


def test_a_date_invalid_in_either_order_is_a_bad_row_not_a_mix_of_orders(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # '31/31/2024' (both numbers above 12) made the column "mix" day-first and month-first dates: the whole file
    # was refused, one typo stopping every symbol's load under skip
    raw = "Date,Open,High,Low,Close,Volume\n26/11/2024,10,11,9,10.5,1000\n31/31/2024,10,11,9,10.5,1000\n"
    raw += "04/11/2024,10,11,9,10.5,1000\n"
    src = symbol_file(tmp_path, make_profile, "AAPL.csv", raw.encode(), "skip")
    dates = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, 4), dt.date(2024, 11, 26)]
    assert (
        src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 0
    )  # a bad date: the first month's
    path = tmp_path / "AAPL.csv"
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-10: {path}: 1 rows rejected: date parses as a date (e.g. line 3)"
    ]


def first_days_written_day_first(count: int = 12) -> str:
    """A per-symbol file of November's first ``count`` days written DD/MM/YYYY: every date reads in either order."""
    rows = "".join(f"{day:02d}/11/2024,10,11,9,10.5,{1000 + day}\n" for day in range(1, count + 1))
    return "Date,Open,High,Low,Close,Volume\n" + rows


def ordered_file(
    tmp_path: Path, make_profile: MakeProfile, raw: str, order: str, policy: str = "fail"
) -> FilesSource:
    (tmp_path / "AAPL.csv").write_text(raw)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'\n  on_bad_rows: {policy}"
    return FilesSource(make_profile(profile_body(f"{body}\n  date_order: {order}")))


def test_dates_that_read_in_either_order_are_refused_under_auto(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # read month first: January 11 .. December 11, November's segment empty and the others wrong, without a word
    src = ordered_file(tmp_path, make_profile, first_days_written_day_first(), "auto")
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        f"{tmp_path / 'AAPL.csv'}: columns.date='Date': every date reads with the day first or the month first "
        "(e.g. '01/11/2024'); set source.date_order to day_first or month_first in the profile, or write the "
        "dates as YYYY-MM-DD"
    )


def test_dates_whose_numbers_are_equal_read_the_same_either_way(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    raw = "Date,Open,High,Low,Close,Volume\n11/11/2024,10,11,9,10.5,1000\n"
    src = ordered_file(tmp_path, make_profile, raw, "auto")
    assert src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist() == [dt.date(2024, 11, 11)]


def test_date_order_day_first_reads_the_first_twelve_days(tmp_path: Path, make_profile: MakeProfile) -> None:
    src = ordered_file(tmp_path, make_profile, first_days_written_day_first(), "day_first")
    dates = src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist()
    assert dates == [dt.date(2024, 11, d) for d in (1, 4, 5, 6, 7, 8, 11, 12)]  # the sessions among them
    assert src.version(Segment("AAPL", "1d", NOV)) != ordered_file(
        tmp_path, make_profile, first_days_written_day_first(), "month_first"
    ).version(Segment("AAPL", "1d", NOV))


def test_date_order_month_first_reads_month_first(tmp_path: Path, make_profile: MakeProfile) -> None:
    raw = "Date,Open,High,Low,Close,Volume\n11/04/2024,10,11,9,10.5,1000\n11/05/2024,10,11,9,10.5,1000\n"
    src = ordered_file(tmp_path, make_profile, raw, "month_first")
    assert src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist() == [
        dt.date(2024, 11, 4),
        dt.date(2024, 11, 5),
    ]


@pytest.mark.parametrize(
    ("order", "impossible"), [("day_first", "11/26/2024"), ("month_first", "26/11/2024")]
)
def test_a_date_impossible_in_the_order_given_is_a_bad_row(
    tmp_path: Path, make_profile: MakeProfile, order: str, impossible: str
) -> None:
    # pandas swapped it: '11/26/2024' read day first was November 26, and being first it made '04/11/2024' April 11
    possible = "04/11/2024" if order == "day_first" else "11/04/2024"
    raw = f"Date,Open,High,Low,Close,Volume\n{impossible},10,11,9,10.5,1000\n{possible},10,11,9,10.5,1000\n"
    src = ordered_file(tmp_path, make_profile, raw, order, "skip")
    assert src.fetch(Segment("AAPL", "1d", NOV)).column("date").to_pylist() == [dt.date(2024, 11, 4)]
    assert src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1))).num_rows == 0  # charged to the first month
    path = tmp_path / "AAPL.csv"
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-10: {path}: 1 rows rejected: date parses as a date (e.g. line 2)"
    ]
    failing = ordered_file(tmp_path, make_profile, raw, order, "fail")
    with pytest.raises(Exception, match=f"{impossible}"):
        for month in (dt.date(2024, 10, 1), NOV):
            failing.fetch(Segment("AAPL", "1d", month))


def test_a_batch_reads_each_file_once_for_all_its_months(
    tmp_path: Path, make_profile: MakeProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refresh's batch comes month by month (AAPL Oct, MSFT Oct, AAPL Nov, ...) and the cache holds one file:
    # each per-symbol file was read and validated again for each of its months (8 symbols x 12 months of a
    # year's minute files: 19.2 s of fetching, 7.4 s once per file)
    for symbol in ("AAPL", "MSFT"):
        rows = [line.replace("AAPL", symbol) for line in CLEAN if line.startswith("AAPL,")]
        (tmp_path / f"{symbol}.csv").write_text("\n".join([CLEAN[0], *rows]) + "\n")
    src = FilesSource(
        make_profile(profile_body(f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.csv'"))
    )
    batch = [Segment(s, "1d", m) for m in (dt.date(2024, 10, 1), NOV) for s in ("AAPL", "MSFT")]
    expected = [FilesSource(src.profile).fetch(segment) for segment in batch]
    read = files_module._read
    reads: list[str] = []

    def counted(file: Path, fmt: str, *, leave_out: bool) -> files_module._Read:
        reads.append(file.name)
        return read(file, fmt, leave_out=leave_out)

    monkeypatch.setattr(files_module, "_read", counted)
    tables = src.fetch_many(batch)
    assert sorted(reads) == ["AAPL.csv", "MSFT.csv"]
    assert [t.num_rows for t in tables] == [23, 23, 20, 20]  # in the batch's order, as fetched one by one
    assert all(t.equals(e) for t, e in zip(tables, expected, strict=True))
