"""A CSV row is named by the line it starts on in the file (1-based, the header line 1), as an editor shows it.

pyarrow numbers records, not lines: it skips empty lines and a quoted cell may hold line breaks, so a row after
either was named a line too early. Each case's expected line is counted from the file's text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refresher.errors import SourceError
from refresher.segments import Segment
from refresher.sources import files as files_module
from refresher.sources.files import FilesSource

from .conftest import MakeProfile
from .test_files import NOV, profile_body, symbol_file

HEADER = "Date,Open,High,Low,Close,Volume,Note"
BAD = "2024-11-27,10,11,9,10.5,-5,bad"  # breaks volume >= 0
CUT = "2024-11-25,10,11,9,10.5"  # two cells short of the header
WIDTH = "the line has the header's 7 cells"
BAD_RULE = "volume >= 0"


def good(day: dt.date, note: str = "") -> str:
    return f"{day},10,11,9,10.5,1000,{note}"


def blank_lines() -> str:
    return f"{HEADER}\n{good(dt.date(2024, 11, 26))}\n\n\n{good(dt.date(2024, 11, 29))}\n\n{BAD}\n"


def crlf() -> str:
    return blank_lines().replace("\n", "\r\n")


def quoted_line_breaks() -> str:
    note = '"two\n\nlines, quoted"'
    return f"{HEADER}\n{good(dt.date(2024, 11, 26), note)}\n{BAD}\n"


def bom() -> str:
    return "\ufeff" + blank_lines()


def no_final_line_break() -> str:
    return blank_lines().rstrip("\n")


def blocks(note: str = "x" * 100) -> str:
    # well past pyarrow's 1 MB block: rows of long notes, an empty line every 50, November's rows and the bad last
    days = [dt.date(1950, 1, 1) + dt.timedelta(days=i) for i in range(12_000)]
    lines = [good(day, note) + ("\n" if i % 50 == 0 else "") for i, day in enumerate(days)]
    november = [good(dt.date(2024, 11, 26), note), good(dt.date(2024, 11, 29), note)]
    return "\n".join([HEADER, *lines, *november, BAD]) + "\n"


def quoted_line_breaks_in_blocks() -> str:
    # a quoted line break where pyarrow cut the file into blocks read as two lines cut short: refused under fail
    return blocks(f'"x\n{"x" * 100}"')


CASES: dict[str, Callable[[], str]] = {
    "blank lines": blank_lines,
    "CRLF": crlf,
    "quoted line breaks": quoted_line_breaks,
    "UTF-8 BOM": bom,
    "no final line break": no_final_line_break,
    "pyarrow blocks": blocks,
    "quoted line breaks in pyarrow blocks": quoted_line_breaks_in_blocks,
}


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the file's text on which ``needle`` starts."""
    return text.count("\n", 0, text.index(needle)) + 1


def source(tmp_path: Path, make_profile: MakeProfile, text: str, policy: str) -> tuple[FilesSource, Path]:
    return symbol_file(tmp_path, make_profile, "AAPL.csv", text.encode(), policy), tmp_path / "AAPL.csv"


@pytest.mark.parametrize("case", sorted(CASES))
def test_fail_names_the_line_the_bad_row_is_on(tmp_path: Path, make_profile: MakeProfile, case: str) -> None:
    text = CASES[case]()
    src, path = source(tmp_path, make_profile, text, "fail")
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {line_of(text, BAD)}: Volume=-5: breaks the rule volume >= 0"), (
        message
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_quarantine_keeps_the_line_the_bad_row_is_on(
    tmp_path: Path, make_profile: MakeProfile, case: str
) -> None:
    text = CASES[case]()
    src, path = source(tmp_path, make_profile, text, "quarantine")
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == len(
        re.findall("^2024-11-2[69],.*,1000,", text, re.M)
    )
    [reject] = src.rejects[Segment("AAPL", "1d", NOV)]
    assert (reject.source, reject.row, reject.rule) == (str(path), line_of(text, BAD), "volume >= 0")
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 1 rows quarantined: volume >= 0 (e.g. line {line_of(text, BAD)})"
    ]


def with_cut(text: str) -> str:
    """The text with an empty line and a line two cells short before the bad row."""
    bad = text.index(BAD)
    return f"{text[:bad]}\n{CUT}\n{text[bad:]}"


@pytest.mark.parametrize(
    "case", sorted(set(CASES) - {"pyarrow blocks", "quoted line breaks in pyarrow blocks"})
)
def test_fail_names_the_line_with_more_or_fewer_cells(
    tmp_path: Path, make_profile: MakeProfile, case: str
) -> None:
    text = with_cut(CASES[case]())
    src, path = source(tmp_path, make_profile, text, "fail")
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value).startswith(
        f"{path}: line {line_of(text, CUT)}={CUT!r}: 5 cells where the header has 7"
    )
    assert info.value.fields["field"] == f"line {line_of(text, CUT)}"


@pytest.mark.parametrize("piece", [None, 1, 3], ids=["16MB", "1B", "3B"])
@pytest.mark.parametrize(
    "case", sorted(set(CASES) - {"pyarrow blocks", "quoted line breaks in pyarrow blocks"})
)
def test_quarantine_keeps_the_lines_of_a_line_with_more_or_fewer_cells_and_the_rows_after_it(
    tmp_path: Path, make_profile: MakeProfile, case: str, piece: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if piece is not None:  # the file's line breaks looked for a few bytes at a time: a CRLF split between two
        monkeypatch.setattr(files_module, "_PIECE", piece)
    text = with_cut(CASES[case]())
    src, _ = source(tmp_path, make_profile, text, "quarantine")
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == len(
        re.findall("^2024-11-2[69],.*,1000,", text, re.M)
    )
    src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1)))
    rejects = sorted((r.row, r.rule) for rs in src.rejects.values() for r in rs)
    assert rejects == [(line_of(text, CUT), WIDTH), (line_of(text, BAD), "volume >= 0")]


def test_lines_with_more_or_fewer_cells_past_pyarrows_first_block(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    text = blocks()
    last = text.rindex(good(dt.date(1950, 1, 1) + dt.timedelta(days=11_990), "x" * 100))
    text = f"{text[:last]}{CUT}\n{text[last:]}"
    for policy in ("fail", "quarantine"):
        src, path = source(tmp_path, make_profile, text, policy)
        if policy == "fail":
            with pytest.raises(SourceError) as info:
                src.fetch(Segment("AAPL", "1d", NOV))
            assert str(info.value).startswith(f"{path}: line {line_of(text, CUT)}={CUT!r}: 5 cells")
            continue
        src.fetch(Segment("AAPL", "1d", NOV))
        src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1)))
        rejects = sorted((r.row, r.rule) for rs in src.rejects.values() for r in rs)
        assert rejects == [(line_of(text, CUT), WIDTH), (line_of(text, BAD), "volume >= 0")]


@pytest.mark.parametrize("piece", [None, 1, 2])
def test_a_lone_cr_ends_a_line_as_pyarrow_reads_it(
    tmp_path: Path, make_profile: MakeProfile, piece: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if piece is not None:
        monkeypatch.setattr(files_module, "_PIECE", piece)
    text = f"\r\n{HEADER}\r{good(dt.date(2024, 11, 26))}\r\r\n\n{CUT}\r\n\r{BAD}"
    src, _ = source(tmp_path, make_profile, text, "quarantine")
    src.fetch(Segment("AAPL", "1d", NOV))
    src.fetch(Segment("AAPL", "1d", dt.date(2024, 10, 1)))
    lines = re.split("\r\n|\r|\n", text)
    expected = [(lines.index(CUT) + 1, WIDTH), (lines.index(BAD) + 1, "volume >= 0")]
    assert (
        sorted((r.row, r.rule) for rs in src.rejects.values() for r in rs)
        == expected
        == [(6, WIDTH), (8, BAD_RULE)]
    )


def test_daily_times_with_offsets_and_quoted_line_breaks_in_pyarrow_blocks_keep_their_dates(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # zoned daily times are read a second time as text (d9960be), looking for quoted line breaks as the rows were
    note = f'"x\n{"x" * 100}"'
    days = [dt.date(1950, 1, 1) + dt.timedelta(days=i) for i in range(12_000)] + [dt.date(2024, 11, 26)]
    text = "\n".join([HEADER, *(f"{day}T00:00:00+09:00,10,11,9,10.5,1000,{note}" for day in days)]) + "\n"
    src = symbol_file(tmp_path, make_profile, "7203.csv", text.encode(), "fail")
    assert src.fetch(Segment("7203", "1d", NOV)).column("date").to_pylist() == [dt.date(2024, 11, 26)]


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
def test_a_parquet_files_bad_row_is_named_by_its_row_not_a_line(
    tmp_path: Path, make_profile: MakeProfile, policy: str
) -> None:
    # a Parquet file has no lines: 'line 2' sent the user looking for one
    days = [dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
    table = pa.table(
        {"date": days, "open": [10.0] * 2, "high": [11.0] * 2, "low": [9.0] * 2, "close": [10.5] * 2}
    )
    pq.write_table(table.append_column("volume", pa.array([1000, -5])), tmp_path / "AAPL.parquet")
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.parquet'\n  on_bad_rows: {policy}"
    src = FilesSource(make_profile(profile_body(body)))
    path = tmp_path / "AAPL.parquet"
    if policy == "fail":
        with pytest.raises(SourceError) as info:
            src.fetch(Segment("AAPL", "1d", NOV))
        assert str(info.value).startswith(f"{path}: row 2: volume=-5: breaks the rule volume >= 0"), (
            info.value
        )
        return
    src.fetch(Segment("AAPL", "1d", NOV))
    assert [str(report) for report in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 1 rows quarantined: volume >= 0 (e.g. row 2)"
    ]
    assert [r.row for r in src.rejects[Segment("AAPL", "1d", NOV)]] == [2]
