"""Bad rows and shrinking files through the real CLI and a real server: under ``fail`` the database is byte for
byte what it was; ``skip`` and ``quarantine`` load the rest; an emptied segment is refused unless allowed."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refresher.calendar import sessions_between
from refresher.sources.validate import SPELLED_RULE
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = pytest.mark.slow

START, END = dt.date(2024, 10, 1), dt.date(2024, 11, 29)
PROFILE = """\
universe: {{symbols: [AAPL, MSFT]}}
start: {start}
end: {end}
timeframes: [1d]
source:
  kind: files
  path: data
  daily: bars.csv
  columns: {{symbol: Ticker}}
"""
# Everything the database holds for the data and the ledger, loaded_at included: "unchanged" means unchanged.
CHECKSUM = """
SELECT (SELECT md5(coalesce(string_agg(concat_ws(',', symbol, date, open, high, low, close, volume), ';'
                                      ORDER BY symbol, date), '')) FROM ohlcv_daily),
       (SELECT md5(coalesce(string_agg(concat_ws(',', symbol, timeframe, month, content_hash, rows, loaded_at),
                                      ';' ORDER BY symbol, timeframe, month), '')) FROM refresher_segments)
"""


def clean_lines() -> list[str]:
    lines = ["Ticker,Date,Open,High,Low,Close,Volume"]
    for i, day in enumerate(sessions_between("XNYS", START, END)):
        for symbol, base in (("AAPL", 100.0), ("MSFT", 400.0)):
            o, c = base + i, base + i + 0.5
            lines.append(f"{symbol},{day},{o},{c + 1},{o - 1},{c},{1000 + i}")
    return lines


CLEAN = clean_lines()
SESSIONS = len(CLEAN) // 2
BAD_LINE = 50  # 1-based line in the file: an AAPL row in November
assert CLEAN[BAD_LINE - 1].startswith("AAPL,2024-11")


def with_line(text: str) -> list[str]:
    return [*CLEAN[: BAD_LINE - 1], text, *CLEAN[BAD_LINE:]]


def aapl(day: str, o: str, h: str, lo: str, c: str, v: str) -> str:
    return f"AAPL,{day},{o},{h},{lo},{c},{v}"


DAY = CLEAN[BAD_LINE - 1].split(",")[1]
# (the file's lines, column named, value shown, rule)
BAD = {
    "high below low": (
        with_line(aapl(DAY, "10", "8", "9", "10", "5")),
        "High",
        "8",
        "high >= max(open, close)",
    ),
    "negative volume": (with_line(aapl(DAY, "10", "11", "9", "10", "-5")), "Volume", "-5", "volume >= 0"),
    "NaN close": (
        with_line(aapl(DAY, "10", "11", "9", "NaN", "5")),
        "Close",
        "nan",
        "close is a finite number",
    ),
    "empty close": (
        with_line(aapl(DAY, "10", "11", "9", "", "5")),
        "Close",
        "None",
        "close is a finite number",
    ),
    "duplicate date": (
        [*CLEAN[:BAD_LINE], aapl(DAY, "10", "11", "9", "10", "5"), *CLEAN[BAD_LINE:]],
        "Date",
        DAY,
        "(symbol, date) is unique",
    ),
    "unparseable date": (
        with_line(aapl("2024-1O-15", "10", "11", "9", "10", "5")),
        "Date",
        "2024-1O-15",
        "date parses as a date",
    ),
    # rounded into the bigint column (100), silently
    "fractional volume": (
        with_line(aapl(DAY, "10", "11", "9", "10", "100.5")),
        "Volume",
        "100.5",
        "volume is a whole number",
    ),
    # left out without a word, as a symbol outside the universe is
    "symbol in another case": (
        with_line("a" + CLEAN[BAD_LINE - 1][1:]),
        "Ticker",
        "'aAPL'",
        SPELLED_RULE,
    ),
}


@pytest.fixture(scope="module")
def ws() -> Iterator[Workspace]:
    root = world_traversable_tmp("refresher-badrows-")
    workspace = Workspace(root, "local", f"bad_rows_{uuid.uuid4().hex[:8]}")
    (root / "profiles" / "data").mkdir(parents=True)
    (root / "profiles" / f"{workspace.profile}.yaml").write_text(PROFILE.format(start=START, end=END))
    try:
        yield workspace
    finally:
        workspace.down()


def write(ws: Workspace, lines: list[str]) -> Path:
    path = ws.root / "profiles" / "data" / "bars.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def state(ws: Workspace) -> tuple[str, str]:
    with psycopg.connect(ws.dsn()) as conn:
        row = conn.execute(CHECKSUM).fetchone()
        assert row is not None
        return row[0], row[1]


def scalar(ws: Workspace, query: str) -> object:
    return ws.scalar(query)


AAPL_CLOSES = "SELECT md5(string_agg(close::text, ',' ORDER BY date)) FROM ohlcv_daily WHERE symbol = 'AAPL'"


def refresh_clean(ws: Workspace) -> tuple[str, str]:
    write(ws, CLEAN)
    ws.refresh()
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS
    return state(ws)


@pytest.mark.parametrize("case", sorted(BAD))
def test_fail_is_one_line_and_leaves_the_database_unchanged(ws: Workspace, case: str) -> None:
    before = refresh_clean(ws)
    lines, column, value, rule = BAD[case]
    path = write(ws, lines)
    done = ws.run("refresh", "--profile", ws.profile, "--json", expect=2)
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"{path}: line {BAD_LINE}: {column}=" in message
    assert value in message and rule in message
    assert state(ws) == before


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
def test_skip_and_quarantine_load_the_good_rows(ws: Workspace, policy: str) -> None:
    refresh_clean(ws)
    lines, _, _, rule = BAD["high below low"]
    write(ws, lines)
    report = ws.refresh("--on-bad-rows", policy)
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS - 1
    action = "quarantined" if policy == "quarantine" else "rejected"
    assert [n for n in report["notes"] if action in n and rule in n], report["notes"]
    assert report["left_out"] == {f"{action}: {rule}": 1}
    # reports that stick: a run served from the cache, and the plan, say it again
    again = ws.refresh("--on-bad-rows", policy)
    assert again["segments"]["loaded"] == 0 and again["store"]["misses"] == 0
    assert again["left_out"] == report["left_out"] and again["notes"] == report["notes"]
    plan = json.loads(
        ws.run("plan", "--profile", ws.profile, "--on-bad-rows", policy, "--json")
        .stdout.strip()
        .splitlines()[-1]
    )
    assert plan["notes"] == report["notes"]
    rejects = ws.scalar("SELECT json_agg(json_build_array(symbol, row, rule, raw)) FROM refresher_rejects")
    if policy == "skip":
        assert rejects is None
    else:
        [[symbol, row, got_rule, raw]] = rejects  # type: ignore[misc]
        assert (symbol, row, got_rule) == ("AAPL", BAD_LINE, rule)
        assert float(raw["high"]) == 8 and raw["date"] == DAY
    write(ws, CLEAN)  # the fixed file reloads the segment and clears its rejects
    ws.refresh("--on-bad-rows", policy)
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0


def test_header_only_file_is_refused_then_accepted_with_allow_shrink(ws: Workspace) -> None:
    before = refresh_clean(ws)
    write(ws, CLEAN[:1])
    done = ws.run("refresh", "--profile", ws.profile, "--json", expect=2)
    message = done.stderr.strip()
    assert "\n" not in message
    assert "AAPL 1d 2024-10, 2024-11" in message and "MSFT 1d 2024-10, 2024-11" in message
    assert "--allow-shrink" in message
    assert state(ws) == before
    ws.run("refresh", "--profile", ws.profile, "--json", expect=2)  # refused again, now served from the store
    assert state(ws) == before
    ws.refresh("--allow-shrink")
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 0


def test_symbol_missing_from_a_shared_file_is_refused(ws: Workspace) -> None:
    refresh_clean(ws)
    aapl_before = scalar(ws, AAPL_CLOSES)
    write(ws, [line for line in CLEAN if not line.startswith("MSFT")])
    done = ws.run("refresh", "--profile", ws.profile, "--json", expect=2)
    assert "MSFT 1d 2024-10, 2024-11" in done.stderr and "AAPL" not in done.stderr.split(":", 1)[1]
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily WHERE symbol = 'MSFT'") == SESSIONS
    assert scalar(ws, AAPL_CLOSES) == aapl_before
    report = ws.refresh("--allow-shrink")
    assert report["segments"]["loaded"] == 2
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily WHERE symbol = 'MSFT'") == 0
    assert json.dumps(report)  # the report is still plain JSON


REJECTS = "SELECT json_agg(json_build_array(symbol, month, source, row, rule, raw) ORDER BY row) FROM refresher_rejects"


def test_quarantine_served_from_the_store_fills_a_new_database(ws: Workspace) -> None:
    """A cached run into a database that never saw the fetch writes the same ``refresher_rejects`` rows, and
    ``status --profile`` shows what was quarantined."""
    lines, _, _, rule = BAD["negative volume"]
    write(ws, lines)
    first = ws.refresh("--on-bad-rows", "quarantine")
    quarantined = ws.scalar(REJECTS)
    assert quarantined is not None and len(quarantined) == 1  # type: ignore[arg-type]
    ws.down()  # the database goes; the store stays
    again = ws.refresh("--on-bad-rows", "quarantine")
    assert again["store"]["misses"] == 0 and again["segments"]["loaded"] > 0
    assert again["notes"] == first["notes"]
    assert ws.scalar(REJECTS) == quarantined
    status = ws.run("status", "--profile", ws.profile, "--on-bad-rows", "quarantine", "--json")
    assert json.loads(status.stdout)["notes"] == first["notes"]
    human = ws.run("status", "--profile", ws.profile, "--on-bad-rows", "quarantine")
    assert "quarantined" in human.stderr and rule in human.stderr
    # under another policy the rows are not the ones loaded: status shows that policy's notes (none stored)
    assert json.loads(ws.run("status", "--profile", ws.profile, "--json").stdout)["notes"] == []


def test_fail_into_a_new_server_is_one_line_and_loads_nothing() -> None:
    # A new server: the file is read while the server starts (``refresher.refresh``), before any database.
    root = world_traversable_tmp("refresher-badrows-new-")
    new = Workspace(root, "local", f"bad_rows_new_{uuid.uuid4().hex[:8]}")
    (root / "profiles" / "data").mkdir(parents=True)
    (root / "profiles" / f"{new.profile}.yaml").write_text(PROFILE.format(start=START, end=END))
    try:
        lines, column, _value, rule = BAD["negative volume"]
        path = write(new, lines)
        done = new.run("refresh", "--profile", new.profile, "--json", expect=2)
        message = done.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert f"{path}: line {BAD_LINE}: {column}=" in message and rule in message
        assert new.scalar("SELECT count(*) FROM refresher_segments") == 0
        assert new.scalar("SELECT count(*) FROM ohlcv_daily") == 0
        write(new, CLEAN)
        assert new.refresh()["segments"]["loaded"] == 4
    finally:
        new.down()


def test_switching_to_quarantine_fills_the_rejects_of_segments_already_loaded(ws: Workspace) -> None:
    # The good rows are the same under skip and quarantine: the segment's content matched the ledger, its load
    # was skipped as a no-op, and the rows the user switched to quarantine to see never reached the table.
    refresh_clean(ws)  # whatever the module's other tests left in refresher_rejects goes with this load
    lines, _, _, rule = BAD["high below low"]
    write(ws, lines)
    ws.refresh("--on-bad-rows", "skip")
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0
    ws.refresh("--on-bad-rows", "quarantine")
    rejects = ws.scalar("SELECT json_agg(json_build_array(symbol, row, rule)) FROM refresher_rejects")
    assert rejects == [["AAPL", BAD_LINE, rule]]
    ws.run("reset", "--profile", ws.profile)  # in the pristine copy too
    assert ws.scalar("SELECT json_agg(json_build_array(symbol, row, rule)) FROM refresher_rejects") == rejects


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_switching_back_from_quarantine_clears_the_rejects(ws: Workspace, policy: str) -> None:
    # The good rows are the same under quarantine and skip: the segment's load was skipped as a no-op and its
    # quarantined rows stayed in refresher_rejects, describing a load the database no longer holds.
    refresh_clean(ws)
    lines, _, _, _rule = BAD["high below low"]
    write(ws, lines)
    ws.refresh("--on-bad-rows", "quarantine")
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 1
    if policy == "fail":  # refused, nothing loaded: the rejects still describe the segment's load
        ws.run("refresh", "--profile", ws.profile, "--on-bad-rows", "fail", "--json", expect=2)
        assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 1
        write(ws, CLEAN)
        ws.refresh("--on-bad-rows", "fail")
    else:
        ws.refresh("--on-bad-rows", "skip")
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0
    ws.run("reset", "--profile", ws.profile)  # in the pristine copy too
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0


# Lines with more or fewer cells than the header: under fail the one-line error (056949e); under skip and
# quarantine bad rows like the others, which keep their counts and line numbers.
CUT, STRAY, NEGATIVE = BAD_LINE, BAD_LINE + 1, BAD_LINE + 10  # AAPL, MSFT, AAPL in November
assert [CLEAN[n - 1][:4] for n in (CUT, STRAY, NEGATIVE)] == ["AAPL", "MSFT", "AAPL"]
LOADED = "SELECT json_agg(json_build_array(symbol, date::text, close) ORDER BY symbol, date) FROM ohlcv_daily"


def named(lines: list[str]) -> list[str]:
    """The lines with a first column of names holding quoted commas (the profile maps Ticker by name)."""
    return ["Name," + lines[0]] + [f'"{line.split(",")[0]}, Inc.",{line}' for line in lines[1:]]


def wrong_width(lines: list[str]) -> list[str]:
    changed = list(lines)
    changed[CUT - 1] = lines[CUT - 1].rsplit(",", 1)[0]  # a volume cut off
    changed[STRAY - 1] = lines[STRAY - 1] + ",000"  # a volume written 1,000
    changed[NEGATIVE - 1] = lines[NEGATIVE - 1].rsplit(",", 1)[0] + ",-5"  # a bad row of another kind
    return changed


def loaded_rows(lines: list[str]) -> list[list[object]]:
    """(symbol, date, close) of the clean file's lines, as the database would hold them."""
    rows = [line.split(",") for line in lines[1:]]
    return sorted([symbol, day, float(close)] for symbol, day, _o, _h, _l, close, _v in rows)


@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted-commas"])
@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
def test_a_line_with_more_or_fewer_cells_than_the_header(ws: Workspace, policy: str, quoted: bool) -> None:
    before = refresh_clean(ws)
    lines = wrong_width(named(CLEAN) if quoted else CLEAN)
    path = write(ws, lines)
    cells = 8 if quoted else 7
    done = ws.run(
        "refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2 * (policy == "fail")
    )
    if policy == "fail":
        message = done.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert message.startswith(
            f"refresher: {path}: line {CUT}={lines[CUT - 1]!r}: {cells - 1} cells where the header has {cells}; "
        )
        assert state(ws) == before
        return
    assert "Traceback" not in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    good = [n for n in range(2, len(CLEAN) + 1) if n not in (CUT, STRAY, NEGATIVE)]
    assert ws.scalar(LOADED) == loaded_rows([CLEAN[0], *(CLEAN[n - 1] for n in good)])
    action = "quarantined" if policy == "quarantine" else "rejected"
    width = f"the line has the header's {cells} cells"
    assert report["left_out"] == {f"{action}: {width}": 2, f"{action}: volume >= 0": 1}
    # a line split into no columns has no date: charged to its symbol's first month, named by its number
    assert [n for n in report["notes"] if action in n] == [
        f"AAPL/1d/2024-10: {path}: 1 rows {action}: {width} (e.g. line {CUT}: {cells - 1} cells)",
        f"AAPL/1d/2024-11: {path}: 1 rows {action}: volume >= 0 (e.g. line {NEGATIVE})",
        f"MSFT/1d/2024-10: {path}: 1 rows {action}: {width} (e.g. line {STRAY}: {cells + 1} cells)",
    ]
    rejects = ws.scalar(
        'SELECT json_agg(json_build_array(symbol, month::text, row, rule, "column", raw) ORDER BY row) '
        "FROM refresher_rejects"
    )
    if policy == "skip":
        assert rejects is None
    else:
        assert rejects == [
            ["AAPL", "2024-10-01", CUT, width, "line", {"line": lines[CUT - 1]}],
            ["MSFT", "2024-10-01", STRAY, width, "line", {"line": lines[STRAY - 1]}],
            ["AAPL", "2024-11-01", NEGATIVE, "volume >= 0", "volume", rejects[2][5]],  # type: ignore[index]
        ]
    again = ws.refresh("--on-bad-rows", policy)  # reports that stick: served from the store, said again
    assert again["store"]["misses"] == 0 and again["notes"] == report["notes"]


@pytest.mark.parametrize("policy", ["skip", "quarantine"])
def test_a_file_whose_every_line_has_more_or_fewer_cells_empties_nothing(ws: Workspace, policy: str) -> None:
    # A header that names a column the lines lack (or a file of another layout): every line is left out, which
    # would replace each loaded segment by an empty one; refused, as for a header alone, until --allow-shrink.
    before = refresh_clean(ws)
    write(ws, [CLEAN[0] + ",Adj Close", *CLEAN[1:]])
    done = ws.run("refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2)
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "AAPL 1d 2024-10, 2024-11" in message and "MSFT 1d 2024-10, 2024-11" in message
    assert "--allow-shrink" in message
    assert state(ws) == before
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
def test_a_bad_row_after_empty_lines_is_named_by_its_line_in_the_file(ws: Workspace, policy: str) -> None:
    # pyarrow skips empty lines and numbers the rows it reads: the row was named 3 lines early
    before = refresh_clean(ws)
    lines, column, value, rule = BAD["negative volume"]
    lines = [*lines[:5], "", "", *lines[5:20], "", *lines[20:]]
    path = write(ws, lines)
    line = path.read_text().split("\n").index(BAD["negative volume"][0][BAD_LINE - 1]) + 1
    done = ws.run(
        "refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2 * (policy == "fail")
    )
    if policy == "fail":
        message = done.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert f"{path}: line {line}: {column}={value}: breaks the rule {rule}" in message
        assert state(ws) == before
    else:
        rejects = ws.scalar("SELECT json_agg(json_build_array(symbol, row, rule)) FROM refresher_rejects")
        assert rejects == [["AAPL", line, rule]]


@pytest.mark.parametrize("case", ["fractional volume", "symbol in another case"])
def test_a_fractional_volume_or_a_symbol_in_another_case_is_quarantined(ws: Workspace, case: str) -> None:
    refresh_clean(ws)
    lines, _, value, rule = BAD[case]
    write(ws, lines)
    report = ws.refresh("--on-bad-rows", "quarantine")
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS - 1
    assert report["left_out"] == {f"quarantined: {rule}": 1}
    rejects = ws.scalar(
        'SELECT json_agg(json_build_array(symbol, row, rule, "column", raw)) FROM refresher_rejects'
    )
    column = "volume" if case == "fractional volume" else "symbol"
    [[symbol, row, got_rule, got_column, raw]] = rejects  # type: ignore[misc]
    assert (symbol, row, got_rule, got_column) == ("AAPL", BAD_LINE, rule, column)
    assert raw[column] == value.strip("'")  # as the file wrote it


# Not UTF-8: UTF-16 with its byte order mark (Excel's "Unicode Text"), Latin-1 (a name with an accent).
ENCODED = {
    "UTF-16": ("\ufeff" + "\n".join(CLEAN) + "\n").encode("utf-16-le"),
    "Latin-1": (
        "\n".join(["Name," + CLEAN[0], *(f"Soci\u00e9t\u00e9,{line}" for line in CLEAN[1:])]) + "\n"
    ).encode("latin-1"),
}


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
@pytest.mark.parametrize("encoding", sorted(ENCODED))
def test_a_csv_that_is_not_utf8_is_one_line_and_leaves_the_database_unchanged(
    ws: Workspace, encoding: str, policy: str
) -> None:
    # UTF-16 failed as 'columns.symbol='Ticker': no such column (has: ...)' naming NUL-ridden columns; Latin-1
    # as pyarrow's 'invalid UTF8 data', naming no line
    before = refresh_clean(ws)
    path = write(ws, [])
    path.write_bytes(ENCODED[encoding])
    done = ws.run("refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2)
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    if encoding == "UTF-16":
        assert message == (
            f"refresher: {path}: the file is UTF-16 LE text (its byte order mark says so), not UTF-8: "
            "save it as UTF-8 (in Excel: CSV UTF-8)"
        )
    else:
        offset = ENCODED[encoding].index(b"\xe9")
        assert message.startswith(
            f"refresher: {path}: line 2 (byte offset {offset}): b'\\xe9' is not UTF-8 text"
        )
    assert state(ws) == before
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0
    # the same file as UTF-8 with a byte order mark loads
    path.write_bytes(
        ENCODED[encoding].decode("utf-16" if encoding == "UTF-16" else "latin-1").encode("utf-8-sig")
    )
    ws.refresh("--on-bad-rows", policy)
    assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS


def day_first(lines: list[str]) -> list[str]:
    """The file's dates written DD/MM/YYYY."""
    rows = [line.split(",") for line in lines[1:]]
    return [lines[0], *(",".join([s, f"{d[8:]}/{d[5:7]}/{d[:4]}", *rest]) for s, d, *rest in rows)]


def with_date_order(ws: Workspace, order: str | None) -> None:
    text = PROFILE.format(start=START, end=END)
    path = ws.root / "profiles" / f"{ws.profile}.yaml"
    path.write_text(text if order is None else f"{text}  date_order: {order}\n")


def one_line(ws: Workspace) -> str:
    message = ws.run("refresh", "--profile", ws.profile, "--json", expect=2).stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    return message


def test_date_order(ws: Workspace) -> None:
    """A bad source.date_order, a file whose every date reads in either order under auto, and under month_first a
    file written day first: one line each, exit 2, the database unchanged; under day_first it loads."""
    before = refresh_clean(ws)
    try:
        with_date_order(ws, "dayfirst")
        profile = ws.root / "profiles" / f"{ws.profile}.yaml"
        message = one_line(ws)
        assert f"{profile}: source.date_order='dayfirst'" in message and "'day_first'" in message
        assert state(ws) == before
        # November's first twelve days, written day first, were loaded month first: January 11 .. December 11
        with_date_order(ws, None)
        early = [line for line in day_first(CLEAN)[1:] if int(line.split(",")[1][:2]) <= 12]
        path = write(ws, [CLEAN[0], *early])
        message = one_line(ws)
        assert (
            f"{path}: columns.date='Date': every date reads with the day first or the month first" in message
        )
        assert "(e.g. '01/10/2024'); set source.date_order to day_first or month_first" in message
        assert state(ws) == before
        with_date_order(ws, "month_first")
        write(ws, day_first(CLEAN))
        message = one_line(ws)
        assert "date parses as a date" in message and "/2024" in message
        assert state(ws) == before
        with_date_order(ws, "day_first")
        ws.refresh()
        assert state(ws)[0] == before[0]  # the same rows (the segments' versions name the option)
    finally:
        with_date_order(ws, None)


# Rows of a symbol outside the universe (left out without a word) filling the file past its first 64 KB, the part
# looked through for another encoding before every read.
PAST_THE_HEAD = [f"GOOG,2024-10-{1 + i % 28:02d},10,11,9,10.5,{i}" for i in range(2_500)]


@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
@pytest.mark.parametrize("cell", ["Close", "Ticker"])
def test_a_nul_byte_past_the_first_64kb_is_one_line_and_leaves_the_database_unchanged(
    ws: Workspace, cell: str, policy: str
) -> None:
    # within the first 64 KB a NUL is refused, as UTF-16 without a byte order mark has them; past them it was read:
    # in a Close cell a bad row whose quarantined cell Postgres' jsonb cannot hold, in a Ticker cell a row of no
    # symbol, left out without a word
    before = refresh_clean(ws)
    bad = CLEAN[BAD_LINE - 1].split(",")
    bad[0 if cell == "Ticker" else 5] += "\0"
    lines = [CLEAN[0], *PAST_THE_HEAD, *CLEAN[1 : BAD_LINE - 1], ",".join(bad), *CLEAN[BAD_LINE:]]
    path = write(ws, lines)
    offset = path.read_bytes().index(b"\0")
    assert offset > 1 << 16
    done = ws.run("refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2)
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(
        f"refresher: {path}: line {len(PAST_THE_HEAD) + BAD_LINE} (byte offset {offset}): a NUL byte "
        "is not UTF-8 text"
    ), message
    assert state(ws) == before
    assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0


def parquet_table(lines: list[str]) -> pa.Table:
    """The CSV lines as a Parquet table: numbers as doubles, but Close as text (a reader accepts either)."""
    names = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    cells = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    numbers = {
        name: pa.array(cells[name], pa.string()).cast(pa.float64()) for name in names[2:] if name != "Close"
    }
    return pa.table({**cells, **numbers}).select(names)


def with_parquet(ws: Workspace, parquet: bool) -> Path:
    text = PROFILE.format(start=START, end=END)
    (ws.root / "profiles" / f"{ws.profile}.yaml").write_text(
        text.replace("bars.csv", "bars.parquet") if parquet else text
    )
    return ws.root / "profiles" / "data" / "bars.parquet"


# The layouts a Parquet text column reads back as; binary (text stored without its UTF-8 mark) is a symbol's only.
PARQUET_TEXT = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "string_view": pa.string_view(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
    "binary": pa.binary(),
}


@pytest.mark.parametrize("policy", ["fail", "skip", "quarantine"])
@pytest.mark.parametrize(
    ("cell", "kind"),
    [
        (cell, kind)
        for cell in ("Close", "Ticker")
        for kind in PARQUET_TEXT
        if kind != "binary" or cell == "Ticker"
    ],
)
def test_a_nul_byte_in_a_parquet_text_cell_is_one_line_and_leaves_the_database_unchanged(
    ws: Workspace, cell: str, kind: str, policy: str
) -> None:
    # in a Ticker cell a row of no symbol, left out without a word under every policy (AAPL a day short, exit 0);
    # in a Close cell written as text a bad row whose quarantined cell Postgres' jsonb cannot hold (the load failed).
    # A string_view column failed with a traceback; a binary Ticker's row was left out unsaid.
    path = with_parquet(ws, True)
    try:
        pq.write_table(parquet_table(CLEAN), path)
        ws.refresh()
        assert scalar(ws, "SELECT count(*) FROM ohlcv_daily") == 2 * SESSIONS
        before = state(ws)
        table = parquet_table(CLEAN)
        cells = table.column(cell).to_pylist()
        row = BAD_LINE - 1  # the row of the CSV's line BAD_LINE, counted from 1
        cells[row - 1] += "\0"
        column = pa.array(cells).cast(PARQUET_TEXT[kind])
        pq.write_table(table.set_column(table.column_names.index(cell), cell, column), path)
        done = ws.run("refresh", "--profile", ws.profile, "--json", "--on-bad-rows", policy, expect=2)
        message = done.stderr.strip()
        assert "\n" not in message and "Traceback" not in message
        assert message == (
            f"refresher: {path}: row {row}: {cell}={cells[row - 1]!r}: a NUL byte in a text cell, which Postgres "
            "cannot hold: write the file without it"
        )
        assert state(ws) == before
        assert scalar(ws, "SELECT count(*) FROM refresher_rejects") == 0
    finally:
        with_parquet(ws, False)
