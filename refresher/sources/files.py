"""Bars from a directory of user files: CSV, gzipped CSV or Parquet, one file per symbol or one for all.

Options (from the profile's ``source:``): ``path`` (the directory), ``daily`` and ``minute`` (file names
relative to it; ``{symbol}`` makes them per-symbol, otherwise the file has a symbol column), ``columns``
(our column -> theirs, matched case-insensitively, e.g. ``{symbol: Ticker, close: Adj Close}``), ``format``
(auto from the extension), ``tz`` (zone of naive minute timestamps; default the listing's exchange) and
``label`` (``right`` if their minute bars are stamped with the interval end) and ``date_order`` (``auto``,
``day_first`` or ``month_first``: the order of text dates like 04/11/2024; see ``_day_first``).

Every row is validated (``refresher.sources.validate``); rows outside the exchange's sessions are dropped
and described in ``reports``. Messages name a CSV row by the line it starts on in the file, as an editor counts
them (the header is line 1; empty lines and line breaks in quoted cells count).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from refresher.calendar import ExchangeCalendar, days_since_epoch, get_calendar
from refresher.errors import SourceError
from refresher.profile import FilesSourceSpec, Profile
from refresher.schema import empty_table
from refresher.segments import Segment, Timeframe
from refresher.sources._file_status import file_status, unreadable
from refresher.sources.base import Source, SourceReport, effective_range, reader_tag
from refresher.sources.validate import F64, I64, VALUE_COLUMNS, Bars, Mask, Unsplit, bars_table, screen

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
_EXAMPLES = 3
# Bump whenever this module hands over other rows for the same file and options (``base.reader_tag``). Versions
# before 2 had no tag: a YYYYMMDD column read as nanoseconds (segments loaded empty, 850f700), a daily time with
# an offset dated in UTC (d9960be), a float YYYYMMDD likewise (82861e8). 2 named a CSV row after an empty line or
# a quoted line break by pyarrow's record number, lines too early, in the reports and rejects stored with a segment.
# 3 read '04/11/2024' beside '26/11/2024' as April 11 (the order guessed from the first date text, or each alone).
# 4 rounded a fractional volume (100.5) into the bigint, and left a shared file's rows naming a symbol in another case
# (aapl for AAPL) out unsaid; both are bad rows now, and the quarantined rows of a shared file hold its symbol cell.
# 5 read a column whose text dates all read in either order (01/11/2024..12/11/2024, written day first) month
# first, January 11 to December 11 without a word; it is refused now unless source.date_order says the order.
# 6 read a NUL byte past a CSV's first 64 KB (a symbol cell holding one left its row out without a word), and gave
# a shared file's line of more or fewer cells naming a symbol in another case (aapl) to the profile's first symbol.
# 7 read a NUL byte in a Parquet file's text cell: a symbol cell holding one left its row out without a word.
# 8 read a NUL byte in a Parquet binary symbol cell (text stored without its UTF-8 mark) the same way; a file with a
# string_view or binary_view column (of any use, or a list of them not loaded) failed with a traceback.
# 9 dropped a minute time not on a whole minute (09:30:30) as outside trading minutes; it is a bad row now.
READER_VERSION = 10


@dataclass(frozen=True)
class _Read:
    """A file as read: its rows, and a CSV's lines left out because they did not split into the header's
    columns (``on_bad_rows`` skip or quarantine), with then each row's line number (it is no longer its
    position + 2)."""

    table: pa.Table
    unsplit: tuple[pacsv.InvalidRow, ...] = ()
    lines: I64 | None = None
    breaks: bool = False  # read looking for line breaks in quoted cells (``_BREAKS``)
    # A shared file's unsplit lines by the symbol each names (``FilesSource._unsplit``): split once per read, not
    # once per line and symbol (500 symbols x 10,000 such lines were 5 M reads of a line, about 40 minutes).
    owners: dict[str, list[pacsv.InvalidRow]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )
    # The line each record starts on (``_line_numbers``), found once, when a row is first named.
    starts: list[I64] = dataclasses.field(default_factory=list, compare=False, repr=False)
    # Per date column, whether its text dates put the day first (``_day_first``), decided once for every symbol.
    orders: dict[str, bool] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # Per symbol column, its cells trimmed, and lower-cased where they name a universe symbol in another case only
    # (None when none does; ``FilesSource._spellings``): found once per read, not once per segment.
    spellings: dict[str, tuple[pa.ChunkedArray, pa.ChunkedArray | None]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def day_first(self, path: Path, column: str, field: str, order: str) -> bool:
        """Whether the file's text dates in ``column`` put the day first: ``order`` (source.date_order) when it
        says, else the whole column decides, so a symbol whose days all are 12 or less reads them in its file's
        order."""
        if order != "auto":
            return order == "day_first"
        if column not in self.orders:
            values = self.table.column(column).to_pandas()
            text = pd.api.types.is_string_dtype(values.dtype)
            self.orders[column] = bool(text and _day_first(values, path, field, column))
        return self.orders[column]

    def line_of(self, path: Path, records: I64) -> I64:
        """The file's line numbers of records as pyarrow numbers them (the header is 1)."""
        if not self.starts:
            self.starts.append(_line_numbers(path, self.table.num_rows + len(self.unsplit) + 1))
        return _on_lines(self.starts[0], records)


def _read(path: Path, fmt: str, *, leave_out: bool) -> _Read:
    """The file's rows; a CSV line with more or fewer cells than its header is left out when ``leave_out``,
    else it stops the read, named by its number."""
    if fmt == "auto":
        fmt = "parquet" if path.suffix in (".parquet", ".pq") else "csv"
    convert = pacsv.ConvertOptions(**_CSV_CELLS)
    try:
        if fmt == "parquet":
            # Not pq.read_table: its dataset scanner's threads can outlive a short CLI and abort it at exit
            # ("terminate called without an active exception", apache/arrow#39862); one file needs no scanner.
            with pq.ParquetFile(path) as reader:
                return _Read(_without_views(reader.read()))
        _refuse_other_encoding(path, whole=False)
        # pyarrow detects gzip from the .gz suffix; only an empty cell is null, so a literal NaN stays NaN and
        # messages show what the file says
        return _Read(pacsv.read_csv(path, convert_options=convert))
    except (OSError, pa.ArrowInvalid) as exc:
        if fmt == "csv":
            try:  # a quoted line break where pyarrow cut the file into blocks (1 MB) read as two cut lines
                return _Read(
                    pacsv.read_csv(path, parse_options=_BREAKS, convert_options=convert), breaks=True
                )
            except (OSError, pa.ArrowInvalid):
                pass
            table, unsplit = _read_by_line(path, convert, leave_out=leave_out)
            if unsplit and not leave_out:
                raise _split_error(path, unsplit[0], _line_numbers(path, None)) from None
            if unsplit and table is not None:
                # pyarrow numbers the records it reads (the header is 1), as the rows' positions count them
                numbers = np.arange(2, table.num_rows + len(unsplit) + 2)
                lines = np.setdiff1d(numbers, [row.number for row in unsplit], assume_unique=True)
                return _Read(table, tuple(unsplit), lines, breaks=True)
            _refuse_other_encoding(path, whole=True)  # pyarrow's 'invalid UTF8 data' names no line
        raise SourceError(f"{path}: cannot read as {fmt}: {exc}", file=str(path)) from exc


# Byte order marks of text that is not UTF-8, UTF-32 LE's first: it begins with UTF-16 LE's.
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32 LE"),
    (b"\x00\x00\xfe\xff", "UTF-32 BE"),
    (b"\xff\xfe", "UTF-16 LE"),
    (b"\xfe\xff", "UTF-16 BE"),
)
_HEAD = 1 << 16  # bytes of a CSV looked at before every read for another encoding
_SAVE_AS_UTF8 = "save it as UTF-8 (in Excel: CSV UTF-8)"


def _refuse_other_encoding(path: Path, *, whole: bool) -> None:
    """Refuse a CSV that is not UTF-8 text, in one line naming the file: by its byte order mark (UTF-16 or UTF-32),
    else by the first byte that is not UTF-8 text (a NUL too: UTF-16 or UTF-32 without a mark has them), named by its
    line and byte offset. pyarrow read UTF-16 into columns of NUL-ridden names ('no such column'), and refused a
    Latin-1 'é' as 'invalid UTF8 data', naming no line. A UTF-8 byte order mark is UTF-8 (pyarrow skips it).
    ``whole``: look through the whole file (pyarrow refused it, or read a NUL: ``_refuse_nul``), else through its
    first 64 KB (before every read)."""
    # the file's offset of ``carry``'s first byte; ``carry``: bytes a piece's end cut a character in
    offset, carry = 0, b""
    with pa.input_stream(str(path)) as stream:  # decompressed as read_csv does (.gz)
        while piece := stream.read(_PIECE if whole else _HEAD):
            data = carry + piece
            for mark, name in _BOMS if not offset else ():
                if data.startswith(mark):
                    raise SourceError(
                        f"{path}: the file is {name} text (its byte order mark says so), not UTF-8: {_SAVE_AS_UTF8}",
                        file=str(path),
                        field="encoding",
                        value=name,
                    )
            nul = data.find(b"\0")
            bad, seen = (nul, "a NUL byte") if nul >= 0 else (-1, "")
            try:
                data[: len(data) if nul < 0 else nul].decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and nul < 0:  # the next piece may end the character
                    good = exc.start
                else:
                    bad, good, seen = exc.start, exc.start, f"{data[exc.start : exc.end]!r}"
            if bad >= 0:
                raise SourceError(
                    f"{path}: line {_line_at(path, offset + bad)} (byte offset {offset + bad}): {seen} is not UTF-8 "
                    f"text (the file is in another encoding: Latin-1, Windows-1252, UTF-16?): {_SAVE_AS_UTF8}",
                    file=str(path),
                    field="encoding",
                    value=seen,
                )
            if not whole:
                return
            offset, carry = offset + good, data[good:]
    if carry:
        raise SourceError(
            f"{path}: line {_line_at(path, offset)} (byte offset {offset}): {carry!r} is not UTF-8 text (a character "
            f"cut by the file's end): {_SAVE_AS_UTF8}",
            file=str(path),
            field="encoding",
            value=repr(carry),
        )


def _refuse_nul(path: Path, read: _Read) -> None:
    """Refuse a CSV pyarrow read with a NUL byte in a cell or a column name, as ``_refuse_other_encoding`` does
    (which looks for one in the first 64 KB only, before every read): past them a NUL in a symbol cell left its row
    out without a word (AAPL\\0 is no symbol), and a number's cell holding one was a bad row that Postgres cannot
    quarantine (jsonb holds no \\u0000: the load failed). Postgres text holds no NUL either."""
    if (
        any("\0" in name for name in read.table.column_names)
        or any(map(_holds_nul, read.table.columns))
        or any("\0" in row.text for row in read.unsplit)
    ):
        _refuse_other_encoding(path, whole=True)  # names the first NUL's line and byte offset


def _without_views(table: pa.Table) -> pa.Table:
    """The table with its string_view and binary_view columns (Arrow's view layouts, which a Parquet file written
    from them reads back as) as large_string and large_binary: pyarrow 26 has no take or filter kernel for a view
    (an ArrowNotImplementedError traceback, 'array_take has no kernel matching input types (string_view, ...)',
    whatever the column held), and a view's cells are no offsets and bytes ``_holds_nul`` can look through."""
    for index, field in enumerate(table.schema):
        if pa.types.is_string_view(field.type) or pa.types.is_binary_view(field.type):
            plain = pa.large_string() if pa.types.is_string_view(field.type) else pa.large_binary()
            table = table.set_column(index, field.name, table.column(index).cast(plain))
    return table


def _refuse_nul_cell(path: Path, table: pa.Table) -> None:
    """Refuse a Parquet file with a NUL byte in a text cell or a column name, as a CSV's (``_refuse_nul``): a symbol
    cell holding one left its row out without a word (AAPL\\0 is no symbol), and a date's or a number's (text) was a
    bad row that --on-bad-rows quarantine could not store (jsonb holds no \\u0000: the load failed). A Parquet file
    has no lines and its bytes are no text: the cell is named by its column and its row, counted from 1 as the
    file's bad rows are. Every text column is looked at, as a CSV's (1.2 ms for 2 M rows' two, 3% of their read)."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        if "\0" in name:
            raise SourceError(
                f"{path}: column {name!r}: a NUL byte in a column name, which Postgres cannot hold: write the file "
                "without it",
                file=str(path),
                field=name,
                value=name,
            )
        if pa.types.is_dictionary(column.type):  # its cells' text is in the dictionaries (pandas' categories)
            words = pa.chunked_array([chunk.dictionary for chunk in column.chunks], column.type.value_type)
            if not _holds_nul(words):
                continue
            column = column.cast(column.type.value_type)
        _refuse_nul_text(path, name, column)


def _refuse_nul_text(path: Path, name: str, column: pa.ChunkedArray) -> None:
    """Refuse a text column of a Parquet file holding a NUL byte in a cell: one line naming its first such row
    (counted from 1) and its cell."""
    if _holds_nul(column):
        nul = pc.fill_null(pc.match_substring(column, "\0"), False)
        row = pc.index(nul, True).as_py()
        cell = column[row].as_py()
        text = cell if len(cell) <= 80 else f"{cell[:77]}..."
        raise SourceError(
            f"{path}: row {row + 1}: {name}={text!r}: a NUL byte in a text cell, which Postgres cannot hold: "
            "write the file without it",
            file=str(path),
            field=name,
            value=cell,
        )


def _holds_nul(column: pa.ChunkedArray) -> bool:
    """Whether a text column's cells hold a NUL byte: its chunks' bytes looked at as they are (0.7 ms for 2 M
    cells, pc.match_substring took 13 ms, 5% of read_csv's time)."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return False
    wide = np.int64 if pa.types.is_large_string(column.type) else np.int32
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        if data is not None and len(chunk):
            bounds = np.frombuffer(offsets, wide)[[chunk.offset, chunk.offset + len(chunk)]]
            text = np.frombuffer(data, np.uint8)[bounds[0] : bounds[1]]
            if np.count_nonzero(text) < len(text):
                return True
    return False


def _read_by_line(
    path: Path, convert: pacsv.ConvertOptions, *, leave_out: bool
) -> tuple[pa.Table | None, list[pacsv.InvalidRow]]:
    """The CSV read again on one thread, which knows the number of each line with more or fewer cells than the
    header (pyarrow's threaded error showed the line's text alone): those lines, and the rows without them when
    ``leave_out`` (None when the file does not read even so), else the first such line stops the read."""
    found: list[pacsv.InvalidRow] = []

    def note(row: pacsv.InvalidRow) -> str:
        found.append(row)
        return "skip" if leave_out else "error"

    options = pacsv.ParseOptions(invalid_row_handler=note, newlines_in_values=True)
    try:
        read = pacsv.ReadOptions(use_threads=False)
        return pacsv.read_csv(path, read_options=read, parse_options=options, convert_options=convert), found
    except (OSError, pa.ArrowInvalid):
        return None, found


def _line_numbers(path: Path, records: int | None) -> I64:
    """The line (1-based; LF, CRLF or a lone CR ends one, as pyarrow and editors split them) each record of the
    CSV starts on, the header's first. pyarrow numbers records, not lines: it skips empty lines (a row after one
    was named a line too early) and a quoted cell may hold line breaks. ``records``: how many pyarrow read, when
    known. One pass over the file in 16 MB pieces, made only when a line is named."""
    found: list[I64] = []
    ended, last, quoted = 0, 10, False  # past the pieces: the lines ended, the last byte
    for piece, ends, ended, last in _pieces(path):
        raw = np.frombuffer(piece, np.uint8)
        before = np.concatenate(([last], raw[:-1]))  # a line is empty if one ended just before it
        found.append(np.flatnonzero((before[ends] != 13) & (before[ends] != 10)) + ended + 1)
        ended, last, quoted = ended + len(ends), int(raw[-1]), quoted or b'"' in piece
    if last not in (10, 13):  # a last line without a line break
        found.append(np.array([ended + 1]))
    lines = np.concatenate(found) if found else np.zeros(0, np.int64)
    if records == len(lines) or (records is None and not quoted):
        return lines.astype(np.int64)  # one line per record: no quoted cell holds a line break
    # quoted line breaks: the csv module splits records as pyarrow does (a quote opens a cell at its start only)
    starts: list[int] = []
    with io.TextIOWrapper(pa.input_stream(str(path)), encoding="latin-1", newline="") as text:
        reader = csv.reader(text)
        ended = 0
        try:
            for cells in reader:
                if cells:
                    starts.append(ended + 1)
                ended = reader.line_num
        except (
            csv.Error
        ):  # a cell beyond the csv module's limit: the lines that are not empty, as near as we get
            return lines.astype(np.int64)
    return np.asarray(starts, dtype=np.int64)


def _pieces(path: Path) -> Iterator[tuple[bytes, I64, int, int]]:
    """The file's bytes in pieces of 16 MB, decompressed as read_csv reads them (.gz), each with where lines end
    in it (``_line_ends``), the lines ended before it, and the byte before it (10 at the file's start: as if a line
    had just ended, so an empty first line is empty)."""
    ended, last = 0, 10
    with pa.input_stream(str(path)) as stream:
        while piece := stream.read(_PIECE):
            raw = np.frombuffer(piece, np.uint8)
            ends = _line_ends(raw, last)
            yield piece, ends, ended, last
            ended, last = ended + len(ends), int(raw[-1])


def _line_at(path: Path, offset: int) -> int:
    """The line (1-based) the file's byte at ``offset`` is on (in the text read_csv reads: a .gz decompressed)."""
    start = lines = 0  # the piece's offset in the file; the lines ended before it
    for piece, ends, ended, _ in _pieces(path):
        if offset < start + len(piece):
            return ended + int(np.searchsorted(ends, offset - start)) + 1
        start, lines = start + len(piece), ended + len(ends)
    return lines + 1


def _line_ends(raw: npt.NDArray[np.uint8], last: int) -> I64:
    """Where lines end in a piece of a file's bytes: at a CR, or at an LF that is not a CRLF's (``last``: the
    byte before the piece, 10 at the file's start), as pyarrow and editors split lines."""
    before = np.concatenate(([last], raw[:-1])).astype(np.uint8)
    return np.flatnonzero((raw == 13) | ((raw == 10) & (before != 13)))


def _on_lines(starts: I64, records: I64) -> I64:
    """Records' numbers (the header is 1) as the lines they start on; one beyond what was found keeps its number."""
    index = np.asarray(records, dtype=np.int64) - 1
    known = (index >= 0) & (index < len(starts))
    return np.where(known, starts[np.where(known, index, 0)] if len(starts) else 0, index + 1)


def _split_error(path: Path, row: pacsv.InvalidRow, starts: I64) -> SourceError:
    text = row.text if len(row.text) <= 80 else f"{row.text[:77]}..."
    line = f"line {int(_on_lines(starts, np.array([row.number]))[0])}" if row.number is not None else "a line"
    return SourceError(
        f"{path}: {line}={text!r}: {row.actual_columns} cells where the header has {row.expected_columns}; "
        "fix or remove the line, or set source.on_bad_rows or --on-bad-rows to skip or quarantine to load the rest",
        file=str(path),
        field=line,
        value=row.text,
    )


def _changed(path: Path) -> SourceError:
    return SourceError(f"{path}: changed while it was read; run again once it is written", file=str(path))


def _cells(text: str, count: int) -> list[str]:
    """A line's ``count`` cells as the CSV reader splits them (a quoted comma is no separator)."""
    options = pacsv.ConvertOptions(column_types={f"f{i}": pa.string() for i in range(count)})
    read = pacsv.ReadOptions(autogenerate_column_names=True, use_threads=False)
    try:
        table = pacsv.read_csv(io.BytesIO(f"{text}\n".encode()), read_options=read, convert_options=options)
    except pa.ArrowInvalid:  # a quote left open: no cell to tell
        return []
    return [str(column[0]) for column in table.columns]


# pyarrow cuts a CSV into blocks at line breaks, a quoted one too, unless told to look for quotes (slower): only
# a file the faster read refused is read so.
_BREAKS = pacsv.ParseOptions(newlines_in_values=True)
_PIECE = 1 << 24  # bytes of a file looked at at once for its line breaks

_CSV_CELLS: dict[str, Any] = {"null_values": [""], "strings_can_be_null": True}


def _with_written_dates(read: _Read, path: Path, name: str) -> _Read:
    """Column ``name`` as the calendar date each cell's text starts with.

    pyarrow reads an ISO 8601 time with an offset as its UTC instant (there is no option to keep it as text), so
    '2024-11-26T00:00:00+09:00', a Tokyo daily bar, became 2024-11-25 15:00 UTC and loaded a day early. The
    date the file wrote is the first ten characters of what pyarrow accepted as ISO 8601.
    """
    options = pacsv.ConvertOptions(include_columns=[name], column_types={name: pa.string()}, **_CSV_CELLS)
    try:
        if read.unsplit:  # the lines left out of the rows, left out again
            column, _ = _read_by_line(path, options, leave_out=True)
            if column is None or column.num_rows != read.table.num_rows:  # written to since
                raise _changed(path)
        else:
            parse = _BREAKS if read.breaks else None  # as the rows were read
            column = pacsv.read_csv(path, parse_options=parse, convert_options=options)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{path}: cannot read as csv: {exc}", file=str(path)) from exc
    text = pc.utf8_slice_codeunits(column.column(name), 0, 10)
    table = read.table
    return dataclasses.replace(read, table=table.set_column(table.column_names.index(name), name, text))


class FilesSource(Source):
    """Segments cut from user files; see the module docstring for the options."""

    kind = "files"

    def __init__(self, profile: Profile) -> None:
        super().__init__(profile)
        spec = profile.source
        assert isinstance(spec, FilesSourceSpec)
        self.spec = spec
        self.root = spec.path
        self.patterns: dict[str, str] = {"1d": spec.daily, "1m": spec.minute}
        self.columns: Mapping[str, str] = dict(spec.columns.items())
        self._cache: dict[tuple[Path, int, int], _Read] = {}
        if spec.tz is not None:
            try:  # pandas' own resolver: it takes more than zoneinfo ('+03:00', 'dateutil/...')
                pd.Timestamp(0).tz_localize(spec.tz)
            except Exception as exc:  # found at the first minute segment, a traceback mid-refresh before
                raise SourceError(
                    f"source.tz={spec.tz!r}: unknown time zone ({exc})", field="source.tz", value=spec.tz
                ) from None

    def file_for(self, segment: Segment) -> Path:
        pattern = self.patterns[segment.timeframe]
        return (
            self.root / pattern.format(symbol=segment.symbol)
            if "{symbol}" in pattern
            else self.root / pattern
        )

    def preflight(self) -> None:
        """Refuse a ``source.path`` that is no directory, and a ``source.daily``/``source.minute`` no file of any
        symbol matches: a wrong path or pattern loaded every segment empty, said only in notes, and exited 0."""
        self._require_directory()
        for timeframe in self.profile.timeframes:
            self._require_some_file(timeframe)

    def _require_directory(self) -> None:
        if not self.root.is_dir():
            raise SourceError(
                f"{self.profile.path}: source.path={str(self.root)!r}: no such directory",
                file=str(self.profile.path),
                field="source.path",
                value=str(self.root),
            )

    def _require_some_file(self, timeframe: Timeframe) -> None:
        """Refuse the timeframe's pattern when not one symbol's file is there. Some missing is ordinary (a symbol
        listed later, one without minute data): each is a note and an empty segment (``fetch``)."""
        segments = [Segment(symbol, timeframe, self.profile.months[0]) for symbol in self.profile.symbols]
        # anything there counts, even what cannot be read: its fetch says why in its own words
        if any(os.path.lexists(self.file_for(segment)) for segment in segments):
            return
        for segment in segments:  # aapl.csv for AAPL: the fetch's own line, which names the file to rename
            self._refuse_other_case(self.file_for(segment), segment)
        field, pattern = self._setting(segments[0])
        count = len(segments)
        which = f"for any of the {count} symbols" if "{symbol}" in pattern and count > 1 else "there"
        raise SourceError(
            f"{self.profile.path}: {field}={pattern!r}: no file matches it under source.path={str(self.root)!r} "
            f"{which} (e.g. {self.file_for(segments[0])}); fix source.path or {field}, or leave {timeframe} out "
            "of timeframes",
            file=str(self.profile.path),
            field=field,
            value=pattern,
        )

    def version(self, segment: Segment) -> str:
        path = self.file_for(segment)
        st = self._status(path, segment)
        ident: list[Any] = [str(path), "missing"] if st is None else [str(path), st.st_size, st.st_mtime_ns]
        rng = effective_range(self.profile, segment)
        listing = self.profile.listing(segment.symbol)
        spec = self.spec
        blob = json.dumps(
            [
                ident,
                sorted(self.columns.items()),
                spec.format,
                spec.tz,
                spec.label,
                spec.date_order,
                listing.exchange,
                str(rng),
            ]
        )
        # the policy decides which rows a segment holds, so it is part of what the store keys on
        if spec.on_bad_rows != "fail":
            blob += spec.on_bad_rows
        return reader_tag(self.kind, READER_VERSION) + hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _setting(self, segment: Segment) -> tuple[str, str]:
        """The profile's field naming the segment's file, and its value."""
        field = "source.daily" if segment.timeframe == "1d" else "source.minute"
        return field, self.patterns[segment.timeframe]

    def _status(self, path: Path, segment: Segment) -> os.stat_result | None:
        """The segment's file's status, None when there is none; one line when it is there but cannot be read."""
        return file_status(path, *self._setting(segment))

    def _load(self, path: Path, segment: Segment, *, dates: str | None = None) -> _Read:
        """The file as read once while it is unchanged; ``dates`` names a daily column whose zoned times a CSV
        reader turned into UTC instants, to be read back as the dates the file wrote."""
        key = _identity(path)
        if key not in self._cache:
            try:
                read = _read(path, self.spec.format, leave_out=self.spec.on_bad_rows != "fail")
            except OSError as exc:  # its mode keeps us out, a .gz that is no gzip: a traceback before
                raise unreadable(path, exc, *self._setting(segment)) from None
            if _identity(path) != key:
                # Written to while we read it (an export still running): its last rows may be cut mid-number,
                # a volume of 1000 read as 10 and loaded as if whole.
                raise _changed(path)
            if _is_csv(path, self.spec.format):
                _refuse_nul(path, read)
            else:
                _refuse_nul_cell(path, read.table)
            self._cache = {key: read}  # one file at a time: shared files are read once
        read = self._cache[key]
        if dates is not None and _is_csv(path, self.spec.format):
            kind = read.table.column(dates).type
            if pa.types.is_timestamp(kind) and kind.tz is not None:
                read = self._cache[key] = _with_written_dates(read, path, dates)
        return read

    def _column(self, table: pa.Table, path: Path, target: str, required: bool = True) -> str | None:
        names = [str(name) for name in table.column_names]
        mapped = target in self.columns
        wanted = (self.columns[target],) if mapped else DEFAULT_NAMES[target]
        for name in wanted:
            matches = [column for column in names if column.lower() == name.lower()]
            if mapped and names.count(name) == 1:
                matches = [name]  # the mapping's exact spelling settles 'Close' beside 'close'
            if len(matches) > 1:
                # the last of them was taken silently (or a traceback, for two of one spelling)
                raise SourceError(
                    f"{path}: columns.{target}={name!r}: {len(matches)} columns match "
                    f"({', '.join(map(repr, matches))}); keep one in the file, or name it, spelled exactly, "
                    "in source.columns",
                    file=str(path),
                    field=f"columns.{target}",
                    value=name,
                )
            if matches:
                return matches[0]
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
        self._require_directory()
        if self._status(path, segment) is None:
            self._refuse_other_case(path, segment)
            self.reports.append(SourceReport(segment, str(path), "no such file"))
            return empty_table(segment.timeframe)
        read = self._load(path, segment)
        table = read.table
        frame, names, spelled = self._frame(read, path, segment)
        if not table.num_rows and not read.unsplit:
            # a header alone loaded an empty segment without a word, where a missing file is reported
            self.reports.append(SourceReport(segment, str(path), "the file has no rows (a header alone)"))
        cal = get_calendar(self.profile.listing(segment.symbol).exchange)
        key = "date" if segment.timeframe == "1d" else "ts"
        day_first = read.day_first(path, names[key], f"columns.{key}", self.spec.date_order)
        when, when_ok = self._when(frame["when"], segment, cal, path, names, day_first)
        # A row belongs to this segment when its (exchange-local) date is in the range; a row whose date does
        # not parse belongs to no month, so it is charged to the symbol's first segment (never dropped).
        day = when if segment.timeframe == "1d" else _local_days(when, cal.tz)
        ours = when_ok & (day >= days_since_epoch(rng[0])) & (day <= days_since_epoch(rng[1]))
        if segment.month == self.profile.months[0]:
            ours |= ~when_ok
        frame, when, when_ok = frame[ours], when[ours], when_ok[ours]
        spelled = None if spelled is None else spelled[ours]
        raw = frame.rename(columns={"when": "date" if segment.timeframe == "1d" else "ts"})
        values = {name: _numbers(frame[name]) for name in VALUE_COLUMNS}
        positions = frame.index.to_numpy(np.int64)
        csv_file = _is_csv(path, self.spec.format)
        # pyarrow's record numbers (the header is 1), as lines only when a row is named (``_line_numbers``)
        rows = read.lines[positions] if read.lines is not None else positions + (2 if csv_file else 1)
        # a Parquet file has no lines: its rows are named as such, counted from 1
        place = "line" if csv_file else "row"
        bars = Bars(when, when_ok, values, raw.drop(columns=["_row"], errors="ignore"), rows, place, spelled)
        verdict = screen(
            segment,
            bars,
            source=str(path),
            policy=self.spec.on_bad_rows,
            cal=cal,
            names=names,
            unsplit=self._unsplit(read, path, segment),
            lines=(lambda records: read.line_of(path, records)) if csv_file else None,
        )
        self.reports.extend(verdict.reports)
        if verdict.rejects:
            self.rejects[segment] = list(verdict.rejects)
        keep = verdict.keep
        return bars_table(segment, when[keep], {k: v[keep] for k, v in values.items()})

    def fetch_many(self, segments: Sequence[Segment]) -> list[pa.Table]:
        """``fetch`` of each segment, in order, reading each file's segments one after another: the cache holds
        one file, and a batch comes month by month (``refresher.jobs.segment``), so a per-symbol file was read
        and validated again for each month of it (a 12-month profile read each file 12 times)."""
        by_file: dict[Path, list[int]] = {}
        for i, segment in enumerate(segments):
            by_file.setdefault(self.file_for(segment), []).append(i)
        tables: dict[int, pa.Table] = {}
        for positions in by_file.values():
            for i in positions:
                tables[i] = self.fetch(segments[i])
        return [tables[i] for i in range(len(segments))]

    def _unsplit(self, read: _Read, path: Path, segment: Segment) -> list[Unsplit]:
        """The file's lines left out unsplit that this segment answers for. Such a line belongs to no month (as
        a date that does not parse): to the symbol's first segment; in a shared file, to the symbol its symbol
        cell names (in any case), else (a line cut before it, a symbol not in the profile) to the profile's first
        symbol."""
        if not read.unsplit or segment.month != self.profile.months[0]:
            return []
        rows = list(read.unsplit)
        if "{symbol}" not in self.patterns[segment.timeframe]:
            if not read.owners:
                index = read.table.column_names.index(self._column(read.table, path, "symbol"))
                # a symbol in another case (aapl) is the symbol's, as its rows that split are (``_spellings``)
                symbols = {symbol.lower(): symbol for symbol in self.profile.symbols}
                for row in rows:
                    cells = _cells(row.text, row.actual_columns)
                    cell = cells[index].strip().lower() if index < len(cells) else ""
                    read.owners.setdefault(symbols.get(cell, self.profile.symbols[0]), []).append(row)
            rows = read.owners.get(segment.symbol, [])
        if not rows:
            return []
        lines = read.line_of(path, np.array([row.number for row in rows], dtype=np.int64))
        return [
            Unsplit(int(line), row.text, row.actual_columns, row.expected_columns)
            for line, row in zip(lines, rows, strict=True)
        ]

    def _refuse_other_case(self, path: Path, segment: Segment) -> None:
        """A file named as the symbol's but in another case (aapl.csv for AAPL): one line, exit 2. It loaded
        an empty segment, reported only as 'no such file' beside the file the user can see."""
        try:
            others = [p.name for p in path.parent.iterdir() if p.name.lower() == path.name.lower()]
        except OSError:  # no such directory: the plain report says enough
            return
        if others:
            field, pattern = self._setting(segment)
            raise SourceError(
                f"{path}: no such file for {segment.symbol}, but {', '.join(sorted(others))} is there ({field}="
                f"{pattern!r}; file names are case-sensitive): rename it to {path.name}",
                file=str(path),
                field=field,
                value=pattern,
            )

    def _frame(
        self, read: _Read, path: Path, segment: Segment
    ) -> tuple[pd.DataFrame, dict[str, str], Mask | None]:
        """The segment's symbol's rows with our column names (index: row position in the file), and which of them
        spell it as the universe does when others name it in another case (``Bars.spelled``), else None."""
        table = read.table
        spelled: Mask | None = None
        when_target = "date" if segment.timeframe == "1d" else "ts"
        names = {t: str(self._column(table, path, t)) for t in VALUE_COLUMNS}
        names["when"] = str(self._column(table, path, when_target))
        if segment.timeframe == "1d":
            table = self._load(path, segment, dates=names["when"]).table
        sym_col = self._column(
            table, path, "symbol", required="{symbol}" not in self.patterns[segment.timeframe]
        )
        if sym_col is not None:
            symbols, other_case = self._spellings(read, table, path, sym_col)
            mine = pc.fill_null(pc.equal(symbols, segment.symbol), False)
            chosen = mine
            if other_case is not None:  # rows of the symbol in another case: bad rows, never left out unsaid
                chosen = pc.or_(mine, pc.fill_null(pc.equal(other_case, segment.symbol.lower()), False))
            positions = np.flatnonzero(chosen.to_numpy(zero_copy_only=False))
            if not len(positions) and table.num_rows:
                # a symbol spelled otherwise in the file (AAPL.O) loaded nothing and said nothing
                seen = pc.unique(symbols).to_pylist()[:_EXAMPLES]
                reason = f"no row has {sym_col}={segment.symbol!r} (it has e.g. {', '.join(map(repr, seen))})"
                self.reports.append(SourceReport(segment, str(path), reason))
            if chosen is not mine:
                spelled = np.asarray(mine.filter(chosen).to_numpy(zero_copy_only=False), dtype=np.bool_)
            names["symbol"] = sym_col  # its cells in the messages and the quarantined rows
            # the columns read, alone: one not loaded may be of a type pyarrow cannot filter (a list of string_view
            # values: 'array_take has no kernel', a traceback), and filtering it is work for nothing
            table = table.select(list(dict.fromkeys(names.values()))).filter(chosen)
        else:
            positions = np.arange(table.num_rows)
        for target in VALUE_COLUMNS:
            kind = table.column(names[target]).type
            if not _may_be_numbers(kind):  # pandas made booleans 0/1 and durations nanoseconds, silently
                raise SourceError(
                    f"{path}: columns.{target}={names[target]!r}: holds {kind}, not numbers",
                    file=str(path),
                    field=f"columns.{target}",
                    value=names[target],
                )
        frame = pd.DataFrame({t: _raw_column(table.column(n)) for t, n in names.items()})
        frame.index = pd.Index(positions)
        names[when_target] = names.pop("when")
        return frame, names, spelled

    def _spellings(
        self, read: _Read, table: pa.Table, path: Path, column: str
    ) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None]:
        """The symbol column's cells trimmed of spaces, and lower-cased where a cell names a symbol of the
        universe in another case only (``aapl`` for ``AAPL``; null elsewhere), None when no cell does. Such rows
        were left out without a word, as a symbol outside the universe is: almost surely a slip, they are bad
        rows of the symbol they name (a universe holds one spelling of a symbol: the profile refuses AAPL beside
        aapl)."""
        if column not in read.spellings:
            try:
                text = table.column(column).cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # a struct or list column
                raise SourceError(
                    f"{path}: columns.symbol={column!r}: holds {table.column(column).type}, not text ({exc})",
                    file=str(path),
                    field="columns.symbol",
                    value=column,
                ) from None
            # A Parquet binary column (text a writer stored without its UTF-8 mark) is read as text here, so a NUL in
            # it is one in a text cell: AA\0PL's row was left out without a word (the file's look at its text
            # columns, ``_refuse_nul_cell``, passes binary ones by: their bytes are no text until used as such).
            _refuse_nul_text(path, column, text)
            symbols = pc.utf8_trim_whitespace(text)
            universe = list(self.profile.symbols)
            lowered = pc.utf8_lower(symbols)
            other = pc.and_(
                pc.invert(pc.is_in(symbols, value_set=pa.array(universe, pa.string()))),
                pc.is_in(lowered, value_set=pa.array([s.lower() for s in universe], pa.string())),
            )
            other = pc.fill_null(other, False)
            other_case = None
            if pc.any(other).as_py():
                other_case = pc.if_else(other, lowered, pa.scalar(None, pa.string()))
            read.spellings[column] = (symbols, other_case)
        return read.spellings[column]

    def _when(
        self,
        raw: pd.Series,
        segment: Segment,
        cal: ExchangeCalendar,
        path: Path,
        names: Mapping[str, str],
        day_first: bool,
    ) -> tuple[I64, Mask]:
        """Parsed dates (days since 1970-01-01) or UTC bar starts (ns), and which rows parsed."""
        if raw.dtype.kind in "iuf" or _numbers_with_nulls(raw):
            # pandas reads a number as nanoseconds since 1970: 20241126 fell outside every month and its rows
            # vanished unreported. As text it parses as the YYYYMMDD it is, and anything else (epoch seconds)
            # fails the timestamp rule with its value shown.
            raw = _number_text(raw)
        if self.spec.date_order != "auto" and pd.api.types.is_string_dtype(raw.dtype):
            # pandas swaps a date impossible in the order asked ('11/26/2024' day first is November 26), and when
            # it comes first reads the whole column in the other order ('04/11/2024' as April 11): it is a bad row
            # instead, left out of the parse. Under auto the column's order has no such date (it would be a mix).
            raw = raw.mask(_out_of_order(raw, day_first))
        when = _parsed_times(
            raw, segment, path, names["date" if segment.timeframe == "1d" else "ts"], day_first
        )
        if segment.timeframe == "1d":
            if getattr(when.dt, "tz", None) is not None:
                when = when.dt.tz_localize(None)
            ok = when.notna().to_numpy()
            days = when.to_numpy(dtype="datetime64[D]").astype(np.int64)
            return np.where(ok, days, 0), ok
        if getattr(when.dt, "tz", None) is None:
            when = when.dt.tz_localize(self.spec.tz or cal.tz, ambiguous="NaT", nonexistent="NaT")
        when = when.dt.tz_convert("UTC")
        ok = when.notna().to_numpy()
        t = when.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype(np.int64)
        if self.spec.label == "right":
            t = t - _NS_PER_MIN
        return np.where(ok, t, 0), ok


# A time of day followed by an offset: '09:30Z', '09:30:00-05:00', '09:30:00.5 +0900'.
_OFFSET = r"\d:\d\d(?::\d\d(?:\.\d*)?)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)$"


def _parsed_times(raw: pd.Series, segment: Segment, path: Path, column: str, day_first: bool) -> pd.Series:
    """The column's times as pandas parses them (NaT where one does not parse).

    Times as text with an offset and without, in one column, are refused: pandas parsed the kind of the first
    and made the other kind NaT, a '09:32:00-05:00' said not to parse. Text offsets that differ (the two sides
    of a DST change) are one instant each (pandas raised 'Mixed timezones detected', a traceback).
    """
    when: pd.Series | None = None
    field = f"columns.{'date' if segment.timeframe == '1d' else 'ts'}"
    try:
        mixed = "mixed" if raw.dtype == object else None
        when = pd.to_datetime(raw, errors="coerce", format=mixed, dayfirst=day_first)
        if raw.dtype.kind == "M" or not (when.isna() & raw.notna()).any():
            return when
    except ValueError:  # offsets that differ
        pass
    text = raw.astype(str).where(raw.notna(), "")
    offset = text.str.contains(_OFFSET, regex=True)
    zoned = pd.to_datetime(text[offset], errors="coerce", format="mixed", utc=True)
    naive = pd.to_datetime(text[~offset & raw.notna()], errors="coerce", format="mixed", dayfirst=day_first)
    if zoned.notna().any() and naive.notna().any():
        with_offset, without = text[offset][zoned.notna()].iloc[0], text[~offset][naive.notna()].iloc[0]
        raise SourceError(
            f"{path}: {field}={column!r}: mixes times with and without a UTC offset (e.g. {with_offset!r} "
            f"and {without!r}); write every time with its offset, or none (times without one are read in "
            "source.tz, default the exchange's)",
            file=str(path),
            field=field,
            value=column,
        )
    if when is not None:  # of one kind: what did not parse is a bad row, its value shown
        return when
    if segment.timeframe == "1d":  # the date each one wrote, whatever its offset
        return pd.to_datetime(text.str.slice(0, 10), errors="coerce", format="mixed", dayfirst=day_first)
    return pd.to_datetime(text, errors="coerce", format="mixed", utc=True, dayfirst=day_first)


# A date written with its day and month first, in either order: '26/11/2024', '11.26.2024', '4-11-2024 09:30'.
_DAY_MONTH = r"^\s*(\d{1,2})[/.-](\d{1,2})[/.-]\d{2,4}\b"


def _day_month(raw: pd.Series) -> pd.DataFrame:
    """The two leading numbers (columns 0 and 1) of the column's dates written with day and month first."""
    return raw[raw.notna()].astype(str).str.extract(_DAY_MONTH).dropna().astype(np.int64)


def _out_of_order(raw: pd.Series, day_first: bool) -> pd.Series:
    """Which dates of the column are impossible in the order given: their month's number is above 12."""
    parts = _day_month(raw)
    month = parts[1 if day_first else 0].to_numpy() > 12
    return pd.Series(raw.index.isin(parts.index[month]), index=raw.index)


def _day_first(raw: pd.Series, path: Path, field: str, column: str) -> bool:
    """Whether the column's text dates put the day first: some first number above 12 says so. pandas took the
    order of the first date (of each one, for text of mixed kinds), so '04/11/2024' before '26/11/2024' was April
    11, left out of November unreported, and the other a bad row. A column with a first number above 12 and a
    second above 12 (in two dates: one with both, '31/31/2024', is a date in neither order, a bad row) is
    refused. So is one with neither where some date's numbers differ: a per-symbol file of 01/11/2024 ..
    12/11/2024 written day first was read month first, January 11 to December 11, without a word; only
    source.date_order can say its order. One whose every date has its two numbers equal (05/05/2024) reads the
    same either way."""
    parts = _day_month(raw)
    first, second = parts[0].to_numpy() > 12, parts[1].to_numpy() > 12
    # a date with both above 12 is one in neither order: a bad row (its value shown), not a vote for either
    day, month = first & ~second, second & ~first
    if day.any() and month.any():
        day_first, month_first = raw.loc[parts.index[day][0]], raw.loc[parts.index[month][0]]
        raise SourceError(
            f"{path}: {field}={column!r}: mixes dates with the day first and the month first (e.g. {day_first!r} "
            f"and {month_first!r}); write them in one order, ideally as YYYY-MM-DD",
            file=str(path),
            field=field,
            value=column,
        )
    either = ~day & ~month & ~(first & second) & (parts[0].to_numpy() != parts[1].to_numpy())
    if not day.any() and not month.any() and either.any():
        example = raw.loc[parts.index[either][0]]
        raise SourceError(
            f"{path}: {field}={column!r}: every date reads with the day first or the month first (e.g. "
            f"{example!r}); set source.date_order to day_first or month_first in the profile, or write the "
            "dates as YYYY-MM-DD",
            file=str(path),
            field=field,
            value=column,
        )
    return bool(day.any())


def _raw_column(column: pa.ChunkedArray) -> pd.Series:
    """The column as pandas, an empty cell kept as None (not NaN), so a message can tell the two apart."""
    series: pd.Series = column.to_pandas()
    if column.null_count and series.dtype.kind == "f":
        series = series.astype(object).where(~column.is_null().to_numpy(zero_copy_only=False), None)
    return series


def _numbers_with_nulls(raw: pd.Series) -> bool:
    """A numeric column with an empty cell, which ``_raw_column`` keeps as None: pandas objects."""
    return raw.dtype == object and pd.api.types.infer_dtype(raw, skipna=True) in ("integer", "floating")


def _number_text(raw: pd.Series) -> pd.Series:
    """Numbers as the digits they show, None kept: 20241126.0 (a float column: a Parquet double, or a CSV's
    integers beside an empty cell) as '20241126', not '20241126.0', which parses as no date."""
    values = np.asarray(pd.to_numeric(raw, errors="coerce"), dtype=np.float64)
    whole = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2.0**53)
    text = raw.astype(str)
    text[whole] = values[whole].astype(np.int64).astype(str)
    return text.where(raw.notna(), None)


def _may_be_numbers(kind: pa.DataType) -> bool:
    """Numbers, or text and nulls whose cells the rules check one by one (a CSV's 'n/a' is a bad row)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_string)
    return any(bool(is_kind(kind)) for is_kind in (*kinds, pa.types.is_large_string, pa.types.is_null))


def _identity(path: Path) -> tuple[Path, int, int]:
    st = path.stat()
    return path, st.st_size, st.st_mtime_ns


def _is_csv(path: Path, fmt: str) -> bool:
    return fmt == "csv" or (fmt == "auto" and path.suffix not in (".parquet", ".pq"))


def _numbers(column: pd.Series) -> F64:
    """The column as float64; anything that is not a number (null, text) becomes NaN, for the rules to see."""
    return np.asarray(pd.to_numeric(column, errors="coerce"), dtype=np.float64)


def _local_days(utc_ns: I64, tz: str) -> I64:
    """Exchange-local calendar dates of UTC instants (no session of ours crosses local midnight)."""
    local = pd.DatetimeIndex(utc_ns.view("datetime64[ns]"), tz="UTC").tz_convert(tz).tz_localize(None)
    return np.asarray(local.to_numpy(dtype="datetime64[D]").astype(np.int64))


__all__ = ["DEFAULT_NAMES", "FilesSource"]
