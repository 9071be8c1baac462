"""Rows and files the files source changed or dropped without a word: a fractional volume rounded into the bigint,
a shared file's rows naming a universe symbol in another case left out, a CSV in another encoding than UTF-8 read
as garbled columns or refused naming no line. Each is now a bad row under the policy, or one line naming the file.
"""

from __future__ import annotations

import codecs
import datetime as dt
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refresher.errors import SourceError
from refresher.segments import Segment
from refresher.sources import files as files_module
from refresher.sources.files import FilesSource
from refresher.sources.validate import SPELLED_RULE

from .conftest import MakeProfile
from .test_files import NOV, profile_body, symbol_file

AAPL = Segment("AAPL", "1d", NOV)
WHOLE = "volume is a whole number"
HEADER = "Date,Open,High,Low,Close,Volume"


# --- a fractional volume -----------------------------------------------------------------------------------


def test_a_fractional_csv_volume_is_a_bad_row_not_rounded(tmp_path: Path, make_profile: MakeProfile) -> None:
    # 100.5 loaded as 100 (numpy's rint into the bigint column), and 2.5 as 2: data changed without a word
    raw = f"{HEADER}\n2024-11-26,10,11,9,10.5,1000\n2024-11-27,10,11,9,10.5,100.5\n2024-11-29,10,11,9,10.5,2.5\n"
    src = symbol_file(tmp_path, make_profile, "AAPL.csv", raw.encode(), "fail")
    with pytest.raises(SourceError) as info:
        src.fetch(AAPL)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'AAPL.csv'}: line 3: Volume=100.5: breaks the rule {WHOLE} "), (
        message
    )
    assert "2 bad rows" in message


def test_a_fractional_csv_volume_is_quarantined_and_a_whole_float_loads(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    raw = f"{HEADER}\n2024-11-26,10,11,9,10.5,1000.0\n2024-11-27,10,11,9,10.5,100.5\n2024-11-29,10,11,9,10.5,1e3\n"
    src = symbol_file(tmp_path, make_profile, "AAPL.csv", raw.encode(), "quarantine")
    table = src.fetch(AAPL).to_pydict()
    assert (table["date"], table["volume"]) == ([dt.date(2024, 11, 26), dt.date(2024, 11, 29)], [1000, 1000])
    [reject] = src.rejects[AAPL]
    assert (reject.row, reject.rule, reject.column) == (3, WHOLE, "volume")
    assert json.loads(reject.raw)["volume"] == "100.5"
    path = tmp_path / "AAPL.csv"
    assert [str(r) for r in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 1 rows quarantined: {WHOLE} (e.g. line 3)"
    ]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_fractional_parquet_volume_is_a_bad_row_named_by_its_row(
    tmp_path: Path, make_profile: MakeProfile, policy: str
) -> None:
    days = [dt.date(2024, 11, 26), dt.date(2024, 11, 27), dt.date(2024, 11, 29)]
    table = pa.table(
        {"date": days, "open": [10.0] * 3, "high": [11.0] * 3, "low": [9.0] * 3, "close": [10.5] * 3}
    )
    path = tmp_path / "AAPL.parquet"
    pq.write_table(table.append_column("volume", pa.array([1000.0, 7.25, 2000.0])), path)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: '{{symbol}}.parquet'\n  on_bad_rows: {policy}"
    src = FilesSource(make_profile(profile_body(body)))
    if policy == "fail":
        with pytest.raises(SourceError) as info:
            src.fetch(AAPL)
        assert str(info.value).startswith(f"{path}: row 2: volume=7.25: breaks the rule {WHOLE} "), info.value
        return
    assert src.fetch(AAPL).column("volume").to_pylist() == [1000, 2000]  # whole floats load as they are
    assert [str(r) for r in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 1 rows rejected: {WHOLE} (e.g. row 2)"
    ]


# --- a symbol in another case in a shared file -------------------------------------------------------------

SHARED = """\
Ticker,Date,Open,High,Low,Close,Volume
AAPL,2024-11-26,10,11,9,10.5,1000
aapl,2024-11-27,10,11,9,10.5,1000
MSFT,2024-11-27,400,410,390,405,300
 Aapl ,2024-11-26,10,11,9,10.5,1000
GOOG,2024-11-27,10,11,9,10.5,1000
goog,2024-11-27,10,11,9,10.5,1000
AAPL,2024-11-29,10,11,9,10.5,1000
"""


def shared(tmp_path: Path, make_profile: MakeProfile, policy: str, text: str = SHARED) -> FilesSource:
    (tmp_path / "all.csv").write_text(text)
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.csv\n  on_bad_rows: {policy}"
    return FilesSource(make_profile(profile_body(body)))


def test_a_shared_files_row_naming_a_symbol_in_another_case_is_a_bad_row(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # aapl's row was left out without a report, as GOOG's are (outside the universe): AAPL loaded short a day
    src = shared(tmp_path, make_profile, "fail")
    with pytest.raises(SourceError) as info:
        src.fetch(AAPL)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"{tmp_path / 'all.csv'}: line 3: Ticker='aapl': breaks the rule {SPELLED_RULE} "
    )
    assert "(AAPL/1d/2024-11: 2 bad rows;" in message
    # MSFT has no row in another case: it loads; GOOG and goog are no symbol of the universe: not a word
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 1
    assert src.reports == []


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
def test_rows_naming_a_symbol_in_another_case_are_left_out_and_said(
    tmp_path: Path, make_profile: MakeProfile, policy: str
) -> None:
    src = shared(tmp_path, make_profile, policy)
    # ' Aapl ' on the 26th, beside AAPL's: no second AAPL row, so AAPL's is no repeated date and loads
    table = src.fetch(AAPL).to_pydict()
    assert table["date"] == [dt.date(2024, 11, 26), dt.date(2024, 11, 29)]
    path = tmp_path / "all.csv"
    action = "quarantined" if policy == "quarantine" else "rejected"
    assert [str(r) for r in src.reports] == [
        f"AAPL/1d/2024-11: {path}: 2 rows {action}: {SPELLED_RULE} (e.g. line 3, line 5)"
    ]
    if policy == "quarantine":
        rejects = [(r.row, r.rule, r.column, json.loads(r.raw)["symbol"]) for r in src.rejects[AAPL]]
        assert rejects == [(3, SPELLED_RULE, "symbol", "aapl"), (5, SPELLED_RULE, "symbol", " Aapl ")]
    else:
        assert src.rejects == {}


def test_a_file_whose_rows_all_name_the_symbol_in_another_case_says_so(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # it loaded an empty segment, reported only as 'no row has Ticker='AAPL'' (refused only if it had held rows)
    src = shared(tmp_path, make_profile, "skip", SHARED.replace("AAPL,", "aapl,"))
    assert src.fetch(AAPL).num_rows == 0
    assert [str(r) for r in src.reports] == [
        f"AAPL/1d/2024-11: {tmp_path / 'all.csv'}: 4 rows rejected: {SPELLED_RULE} (e.g. line 2, line 3, line 5)"
    ]


# --- a CSV that is not UTF-8 -------------------------------------------------------------------------------

TEXT = f"{HEADER}\n2024-11-26,10,11,9,10.5,1000\n2024-11-27,10,11,9,10.5,1000\n"
MARKED = {
    "UTF-16 LE": codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
    "UTF-16 BE": codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
    "UTF-32 LE": codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"),
    "UTF-32 BE": codecs.BOM_UTF32_BE + TEXT.encode("utf-32-be"),
}


@pytest.mark.parametrize("name", ["AAPL.csv", "AAPL.csv.gz"])
@pytest.mark.parametrize("encoding", sorted(MARKED))
def test_a_csv_with_the_byte_order_mark_of_another_encoding_is_one_line(
    tmp_path: Path, make_profile: MakeProfile, encoding: str, name: str
) -> None:
    # UTF-16 read as columns of NUL-ridden names: "columns.date='date': no such column (has: ��D)"
    for policy in ("fail", "quarantine"):
        src = symbol_file(tmp_path, make_profile, name, MARKED[encoding], policy)
        with pytest.raises(SourceError) as info:
            src.fetch(AAPL)
        assert str(info.value) == (
            f"{tmp_path / name}: the file is {encoding} text (its byte order mark says so), not UTF-8: "
            "save it as UTF-8 (in Excel: CSV UTF-8)"
        )
        assert info.value.fields == {"file": str(tmp_path / name), "field": "encoding", "value": encoding}


@pytest.mark.parametrize("name", ["AAPL.csv", "AAPL.csv.gz"])
def test_a_latin1_csv_is_named_by_the_line_and_byte_of_its_first_byte_that_is_not_utf8(
    tmp_path: Path, make_profile: MakeProfile, name: str
) -> None:
    # pyarrow: 'CSV conversion error to string: invalid UTF8 data', naming no line
    text = f"{HEADER},Note\n2024-11-26,10,11,9,10.5,1000,Zürich\n\n2024-11-27,10,11,9,10.5,1000,Société\n"
    raw = text.encode("latin-1")
    offset = raw.index("ü".encode("latin-1"))
    src = symbol_file(tmp_path, make_profile, name, raw, "skip")
    with pytest.raises(SourceError) as info:
        src.fetch(AAPL)
    assert str(info.value) == (
        f"{tmp_path / name}: line 2 (byte offset {offset}): b'\\xfc' is not UTF-8 text (the file is in "
        "another encoding: Latin-1, Windows-1252, UTF-16?): save it as UTF-8 (in Excel: CSV UTF-8)"
    )


def test_utf16_without_a_byte_order_mark_is_named_by_its_first_nul(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    src = symbol_file(tmp_path, make_profile, "AAPL.csv", TEXT.encode("utf-16-le"), "fail")
    with pytest.raises(
        SourceError, match=r"AAPL\.csv: line 1 \(byte offset 1\): a NUL byte is not UTF-8 text"
    ):
        src.fetch(AAPL)


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7])
def test_characters_cut_by_the_pieces_read_are_whole_and_lines_counted_across_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    # the whole file is looked through in pieces: a character of 2 to 4 bytes may straddle two
    text = "a,b\r\nZ\u00fcrich,\u20ac\r\n\U0001f600,x\ry\n\n".encode()
    path = tmp_path / "t.csv"
    path.write_bytes(text + b"ok,\xe9\n")
    monkeypatch.setattr(files_module, "_PIECE", piece)
    with pytest.raises(SourceError, match=rf"line 6 \(byte offset {len(text) + 3}\): b'\\xe9' is not UTF-8"):
        files_module._refuse_other_encoding(path, whole=True)
    path.write_bytes(text + "\u00e9".encode()[:1])  # the file ends within a character
    with pytest.raises(
        SourceError, match=rf"line 6 \(byte offset {len(text)}\): b'\\xc3' is not UTF-8 text \(a "
    ):
        files_module._refuse_other_encoding(path, whole=True)
    path.write_bytes(text)
    files_module._refuse_other_encoding(path, whole=True)


def test_utf8_with_a_byte_order_mark_and_characters_beyond_ascii_loads(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    text = f"\ufeff{HEADER},Note\n2024-11-26,10,11,9,10.5,1000,Zürich\n2024-11-27,10,11,9,10.5,1000,😀\n"
    src = symbol_file(tmp_path, make_profile, "AAPL.csv.gz", text.encode(), "fail")
    assert src.fetch(AAPL).num_rows == 2
    assert gzip.decompress((tmp_path / "AAPL.csv.gz").read_bytes()).startswith(codecs.BOM_UTF8)


# Rows of another symbol (left out without a word) filling a file past its first 64 KB, looked through before
# every read for another encoding.
FILL = "".join(f"2024-10-{1 + i % 28:02d},10,11,9,10.5,{i}\n" for i in range(3_000))


@pytest.mark.parametrize("name", ["AAPL.csv", "AAPL.csv.gz"])
@pytest.mark.parametrize(
    "line",
    [
        "2024-11-27,10,11,9,10.5\0,1000,x",  # a bad row whose quarantined cell Postgres' jsonb cannot hold
        "2024-11-27,10,11,9,10.5,1000,Z\0rich",  # a cell of no column loaded
        "2024-11-27,10,11,9,10.5\0,1000",  # a line of fewer cells, left out under skip and quarantine
    ],
    ids=["value", "other column", "cells"],
)
def test_a_nul_byte_past_the_first_64kb_is_refused_as_within_them(
    tmp_path: Path, make_profile: MakeProfile, name: str, line: str
) -> None:
    # within the first 64 KB a NUL is refused (UTF-16 without a byte order mark has them); past them it was read
    head = f"{HEADER},Note\n{FILL.replace(chr(10), ',' + chr(10))}"
    raw = f"{head}{line}\r\n2024-11-29,10,11,9,10.5,1000,y\n".encode()
    offset = raw.index(b"\0")
    assert offset > 1 << 16
    for policy in ("fail", "skip", "quarantine"):
        src = symbol_file(tmp_path, make_profile, name, raw, policy)
        with pytest.raises(SourceError) as info:
            src.fetch(AAPL)
        if policy == "fail" and line.count(",") == 5:  # the line's cells, counted first, stop the read
            assert str(info.value).startswith(
                f"{tmp_path / name}: line {head.count(chr(10)) + 1}={line!r}: 6 cells"
            )
            continue
        assert str(info.value) == (
            f"{tmp_path / name}: line {head.count(chr(10)) + 1} (byte offset {offset}): a NUL byte is not UTF-8 text "
            "(the file is in another encoding: Latin-1, Windows-1252, UTF-16?): save it as UTF-8 (in Excel: CSV UTF-8)"
        )
        assert info.value.fields == {"file": str(tmp_path / name), "field": "encoding", "value": "a NUL byte"}


def test_a_nul_byte_in_a_shared_files_symbol_cell_past_the_first_64kb_is_refused(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # AAPL\0 named no symbol: its row was left out without a word, AAPL loaded short a day
    fill = "".join(f"GOOG,{line}" for line in FILL.splitlines(keepends=True))
    text = f"Ticker,{HEADER}\n{fill}AAPL,2024-11-26,10,11,9,10.5,1000\nAAPL\0,2024-11-27,10,11,9,10.5,1000\n"
    src = shared(tmp_path, make_profile, "skip", text)
    with pytest.raises(
        SourceError, match=rf"all\.csv: line {text.count(chr(10))} \(byte offset \d+\): a NUL byte"
    ):
        src.fetch(AAPL)


def test_a_nul_is_looked_for_in_each_chunks_own_cells() -> None:
    # a chunk may be a slice of a longer array: the bytes of the cells outside it are not its
    cells = pa.array(["ab", "c\0d", "ef"])
    assert not files_module._holds_nul(pa.chunked_array([cells.slice(2), pa.array(["x", None])]))
    assert not files_module._holds_nul(pa.chunked_array([cells.slice(0, 1), cells.slice(2)]))
    assert files_module._holds_nul(pa.chunked_array([cells.slice(1, 1)]))
    assert files_module._holds_nul(pa.chunked_array([pa.array(["ab", "c\0d"], pa.large_string())]))
    assert not files_module._holds_nul(pa.chunked_array([], pa.string()))


def shared_parquet(tmp_path: Path, make_profile: MakeProfile, policy: str, table: pa.Table) -> FilesSource:
    pq.write_table(table, tmp_path / "all.parquet")
    body = f"  kind: files\n  path: {tmp_path}\n  daily: all.parquet\n  on_bad_rows: {policy}"
    return FilesSource(make_profile(profile_body(body)))


def parquet_rows(**cells: pa.Array) -> pa.Table:
    """AAPL's rows of November 26, 27 and 29 (text dates and closes, a note), ``cells`` replacing columns."""
    columns = {
        "Ticker": pa.array(["AAPL"] * 3),
        "Date": pa.array(["2024-11-26", "2024-11-27", "2024-11-29"]),
        "Open": [10.0] * 3,
        "High": [11.0] * 3,
        "Low": [9.0] * 3,
        "Close": pa.array(["10.5"] * 3),
        "Volume": [1000] * 3,
        "Note": pa.array(["a", "b", "c"]),
    }
    return pa.table({**columns, **cells})


@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
@pytest.mark.parametrize(
    ("column", "cells", "shown"),
    [
        # a row of no symbol, left out without a word (AAPL loaded a day short)
        ("Ticker", pa.array(["AAPL", "AAPL\0", "AAPL"]), "'AAPL\\x00'"),
        ("Ticker", pa.array(["AAPL", "AA\0PL", "AAPL"]).dictionary_encode(), "'AA\\x00PL'"),
        # a bad row whose quarantined cell Postgres' jsonb cannot hold (the load failed)
        ("Close", pa.array(["10.5", "10.5\0", None], pa.large_string()), "'10.5\\x00'"),
        ("Date", pa.array(["2024-11-26", "2024-11-27\0", "2024-11-29"]), "'2024-11-27\\x00'"),
        ("Note", pa.array(["a", "Z\0rich", "c"]), "'Z\\x00rich'"),  # a column not loaded
    ],
    ids=["symbol", "symbol-dictionary", "close-text", "date-text", "other column"],
)
def test_a_nul_byte_in_a_parquet_text_cell_is_refused_naming_its_row_and_column(
    tmp_path: Path, make_profile: MakeProfile, policy: str, column: str, cells: pa.Array, shown: str
) -> None:
    refuses_the_second_cell(tmp_path, make_profile, policy, column, cells, shown)


def refuses_the_second_cell(
    tmp_path: Path, make_profile: MakeProfile, policy: str, column: str, cells: pa.Array, shown: str
) -> None:
    """A shared all.parquet whose ``column`` is ``cells`` is refused in one line naming its second row's cell,
    ``shown``, with nothing rejected or reported."""
    src = shared_parquet(tmp_path, make_profile, policy, parquet_rows(**{column: cells}))
    path = tmp_path / "all.parquet"
    with pytest.raises(SourceError) as info:
        src.fetch(AAPL)
    assert str(info.value) == (
        f"{path}: row 2: {column}={shown}: a NUL byte in a text cell, which Postgres cannot hold: write the file "
        "without it"
    )
    value = cells[1].as_py()
    assert info.value.fields == {
        "file": str(path),
        "field": column,
        "value": value.decode() if isinstance(value, bytes) else value,
    }
    assert not src.rejects and not src.reports


# Arrow's layouts of a text column a Parquet file reads back as, each holding AAPL's three cells with a NUL in the second
TEXT_KINDS = {
    "large_string": lambda cells: pa.array(cells, pa.large_string()),
    "string_view": lambda cells: pa.array(cells, pa.string_view()),
    "dictionary": lambda cells: pa.array(cells).dictionary_encode(),
    "dictionary-int8-large": lambda cells: (
        pa.array(cells, pa.large_string())
        .dictionary_encode()
        .cast(pa.dictionary(pa.int8(), pa.large_string()))
    ),
}


@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
@pytest.mark.parametrize("column", ["Ticker", "Date", "Close", "Note"])
@pytest.mark.parametrize("kind", sorted(TEXT_KINDS))
def test_a_nul_byte_in_a_parquet_text_cell_of_any_layout_is_refused(
    tmp_path: Path, make_profile: MakeProfile, policy: str, column: str, kind: str
) -> None:
    # string_view (pyarrow's view layout, kept in the file's schema) failed with a traceback whatever it held:
    # 'array_take has no kernel matching input types (string_view, uint16)'
    cells = parquet_rows().column(column).to_pylist()
    cells[1] = cells[1][:2] + "\0" + cells[1][2:]
    refuses_the_second_cell(tmp_path, make_profile, policy, column, TEXT_KINDS[kind](cells), repr(cells[1]))


@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
@pytest.mark.parametrize(
    "kind",
    [pa.binary(), pa.large_binary(), pa.binary_view(), pa.dictionary(pa.int32(), pa.binary())],
    ids=str,
)
def test_a_nul_byte_in_a_parquet_binary_symbol_cell_is_refused(
    tmp_path: Path, make_profile: MakeProfile, policy: str, kind: pa.DataType
) -> None:
    # text a writer stored without its UTF-8 mark reads as binary, which the symbol column takes as text: AA\0PL's
    # row was left out without a word (AAPL loaded a day short); binary_view failed with a traceback
    cells = pa.array([b"AAPL", b"AA\0PL", b"AAPL"]).cast(kind)
    refuses_the_second_cell(tmp_path, make_profile, policy, "Ticker", cells, "'AA\\x00PL'")


def test_parquet_view_columns_and_binary_bytes_not_loaded_read_as_their_plain_layouts(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # every column of string_view (and a list of them, not loaded) failed with a traceback, even without a NUL; a
    # binary column not loaded is bytes, not text, and may hold a NUL
    views = {name: parquet_rows().column(name).cast(pa.string_view()) for name in ("Ticker", "Date", "Close")}
    table = parquet_rows(
        **views,
        Note=pa.array([[f"n{i}"] for i in range(3)], pa.list_(pa.string_view())),
        Hash=pa.array([b"\0\1", b"\0", b""], pa.binary_view()),
    )
    loaded = shared_parquet(tmp_path, make_profile, "fail", parquet_rows()).fetch(AAPL)
    src = shared_parquet(tmp_path, make_profile, "fail", table)
    assert src.fetch(AAPL) == loaded
    assert loaded.num_rows == 3 and not src.reports


def test_a_nul_byte_in_a_parquet_column_name_is_refused(tmp_path: Path, make_profile: MakeProfile) -> None:
    # a name Postgres cannot hold, as a CSV's
    table = parquet_rows()
    src = shared_parquet(
        tmp_path, make_profile, "skip", table.rename_columns([*table.column_names[:-1], "No\0te"])
    )
    with pytest.raises(SourceError, match=r"all\.parquet: column 'No\\x00te': a NUL byte in a column name"):
        src.fetch(AAPL)


def test_a_parquet_dictionary_word_no_row_uses_is_no_nul_in_a_cell(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # a dictionary (pandas' categories) may keep a word no row holds any more; a long cell is cut in the message
    unused = pa.DictionaryArray.from_arrays(pa.array([0, 0, 0], pa.int8()), pa.array(["AAPL", "GOOG\0"]))
    src = shared_parquet(tmp_path, make_profile, "fail", parquet_rows(Ticker=unused))
    assert src.fetch(AAPL).num_rows == 3
    long = pa.array(["a", "x" * 100 + "\0", "c"])
    src = shared_parquet(tmp_path, make_profile, "fail", parquet_rows(Note=long))
    with pytest.raises(SourceError, match=rf": row 2: Note='{'x' * 77}\.\.\.': a NUL byte in a text cell"):
        src.fetch(AAPL)
