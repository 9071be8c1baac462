"""Adversarial profile and calendar edges, each through the real command where the user sees it: one line
naming the file, the field the user wrote and its value, exit status 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.refresher.test_cli import one_line_error, run_cli


def plan(tmp_path: Path, profile: Path, *extra: str) -> str:
    """The one error line of ``plan`` of ``profile``; the state dir and store it names stay unwritten."""
    state, store = tmp_path / "state", tmp_path / "store"
    line = one_line_error(
        run_cli("plan", "--profile", str(profile), "--state-dir", str(state), "--store", str(store), *extra)
    )
    assert not state.exists() and not store.exists()
    return line


@pytest.mark.parametrize(
    ("body", "extra", "named"),
    [
        # year 1 counted back 3 months was year 0: ValueError, a traceback with exit status 1
        ("months: 3\n", ("--as-of", "0001-01-01"), "as_of='0001-01-01'"),
        ("months: 3\nas_of: 0001-06-30\n", (), "as_of='0001-06-30'"),
        ("start: 0001-01-01\nend: 0001-02-01\n", (), "end='0001-02-01'"),
        # the window counted back from a valid day starts before 2000: named `start`, which the user never wrote
        ("months: 300\nas_of: 2024-02-29\n", (), "months=300"),
        ("months: 3\n", ("--as-of", "2000-01-31"), "months=3"),
        ("start: 1999-06-01\nend: 2000-02-01\n", (), "start='1999-06-01'"),
    ],
)
def test_a_window_before_the_calendars_names_the_field_the_user_wrote(
    tmp_path: Path, body: str, extra: tuple[str, ...], named: str
) -> None:
    path = tmp_path / "early.yaml"
    path.write_text("universe: {symbols: [AAA]}\n" + body)
    line = plan(tmp_path, path, *extra)
    assert f"{path}: {named}:" in line and "2000-01-01" in line, line


@pytest.mark.parametrize(
    ("body", "key", "lines"),
    [
        # PyYAML keeps the last of two equal keys: `months: 3` edited above, a forgotten `months: 1` below won
        ("months: 3\ntimeframes: [1d]\nmonths: 1\n", "months", (2, 4)),
        ("months: 1\nsource:\n  kind: synthetic\n  kind: files\n", "kind", (4, 5)),
        ("months: 1\nseeds: {AAA: 1, AAA: 2}\n", "AAA", (3, 3)),
    ],
)
def test_a_key_given_twice_is_refused_naming_both_lines(
    tmp_path: Path, body: str, key: str, lines: tuple[int, int]
) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("universe: {symbols: [AAA]}\n" + body)
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    first, second = lines
    assert f"{path}: line {second}='{key}': given twice (first on line {first})" in line, line


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    """YAML's ``<<`` merge is meant to be overridden by the mapping's own keys: not a key given twice."""
    merged = tmp_path / "ok.yaml"
    merged.write_text("universe: {symbols: [AAA]}\nmonths: 1\nseeds:\n  <<: {AAA: 1}\n  AAA: 2\n")
    done = run_cli(
        "plan", "--profile", str(merged), "--as-of", "2024-01-31", "--state-dir", str(tmp_path / "s")
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # pydantic's lax mode took a YAML boolean for a number: `months: true` was one month
        ("months: true\n", "months=True"),
        ("months: '3'\n", "months='3'"),
        ("months: 1\nseed: 2.0\n", "seed=2.0"),
        ("months: 1\nseeds: {AAA: true}\n", "seeds.AAA=True"),
        ("months: 1\nuniverse: {symbols: [AAA], count: true}\n", "universe.count=True"),
        # a number for a date was seconds since 1970: `as_of: 1699920000` was 2023-11-14
        ("months: 1\nas_of: 1699920000\n", "as_of=1699920000"),
        ("start: 0\nend: 2024-01-31\n", "start=0"),
        # .inf passed `gt=0`, and `profiles --json` then printed `Infinity`, which is not JSON
        ("months: 1\nreset_target_seconds: .inf\n", "reset_target_seconds=inf"),
        # a number field took a YAML boolean or a quoted number: `true` was 1.0 s, `'30'` was 30.0 s
        ("months: 1\nreset_target_seconds: true\n", "reset_target_seconds=True"),
        ("months: 1\nreset_target_seconds: '30'\n", "reset_target_seconds='30'"),
        # a boolean field took words and numbers: `'no'` and 0 were false, 1 was true
        ("months: 1\nsource: {allow_shrink: 'no'}\n", "source.allow_shrink='no'"),
        ("months: 1\nsource: {kind: files, path: d, allow_shrink: 1}\n", "source.allow_shrink=1"),
        ("months: 1\nsource: {kind: postgres, dsn: x, version_query: 'no'}\n", "source.version_query='no'"),
        ("months: 1\nsource: {kind: postgres, dsn: x, version_query: 0}\n", "source.version_query=0"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(tmp_path: Path, body: str, named: str) -> None:
    path = tmp_path / "typed.yaml"
    path.write_text(body if body.startswith("months: 1\nuniverse") else "universe: {symbols: [AAA]}\n" + body)
    line = plan(tmp_path, path, *(() if "as_of" in body or "end" in body else ("--as-of", "2024-01-31")))
    assert f"{path}: {named}:" in line, line


@pytest.mark.parametrize(
    ("body", "csv", "where", "named"),
    [
        # the second 1d was dropped without a word, where a symbol or feature named twice is refused
        ("universe: {symbols: [AAA]}\ntimeframes: [1d, 1m, 1d]\n", None, "twice.yaml", "timeframes.2='1d'"),
        # csv.DictReader kept the last of two 'symbol' columns: BBB was loaded, AAA silently not
        ("universe: {file: u.csv}\n", "symbol,Symbol \nAAA,BBB\n", "u.csv", "line 1='Symbol '"),
    ],
)
def test_a_timeframe_or_a_universe_column_named_twice_is_refused(
    tmp_path: Path, body: str, csv: str | None, where: str, named: str
) -> None:
    if csv is not None:
        (tmp_path / "u.csv").write_text(csv)
    path = tmp_path / "twice.yaml"
    path.write_text(body + "months: 1\n")
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    assert f"{tmp_path / where}: {named}: named twice" in line, line


def plans(tmp_path: Path, profile: Path) -> None:
    """``plan`` of ``profile`` succeeds."""
    done = run_cli(
        "plan",
        "--profile",
        str(profile),
        "--as-of",
        "2024-01-31",
        "--state-dir",
        str(tmp_path / "s"),
        "--json",
    )
    assert done.returncode == 0, done.stderr


def test_a_universe_file_with_two_blank_or_unread_columns_loads(tmp_path: Path) -> None:
    """Only the columns read are refused twice: a spreadsheet's trailing empty cells, or two notes, are not."""
    (tmp_path / "u.csv").write_text("symbol,note,note,,\nAAA,a,b,,\n")
    path = tmp_path / "blanks.yaml"
    path.write_text("universe: {file: u.csv}\nmonths: 1\n")
    plans(tmp_path, path)


def test_a_universe_file_ending_in_upper_case_csv_is_read(tmp_path: Path) -> None:
    """`universe.file: U.CSV` (as some spreadsheets name their exports) was refused as `must be a .csv file`."""
    (tmp_path / "U.CSV").write_text("symbol\nAAA\n")
    path = tmp_path / "upper.yaml"
    path.write_text("universe: {file: U.CSV}\nmonths: 1\n")
    plans(tmp_path, path)


def test_a_whole_number_target_and_yaml_booleans_still_load(tmp_path: Path) -> None:
    """Strict is not stricter than YAML: an int for a float field, and true/false, are what a user writes."""
    path = tmp_path / "typed.yaml"
    path.write_text(
        "universe: {symbols: [AAA]}\nmonths: 1\nreset_target_seconds: 5\nsource: {kind: synthetic, allow_shrink: true}\n"
    )
    plans(tmp_path, path)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        # a shared file of that literal name: every segment loaded empty, said only as "no such file"
        ("daily/{Symbol}.csv", "unknown placeholder {Symbol}: the only one is {symbol}"),
        ("{ticker}.csv", "unknown placeholder {ticker}: the only one is {symbol}"),
        # KeyError, a traceback with exit status 1 at the first segment read
        ("{symbol}/{date}.csv", "unknown placeholder {date}: the only one is {symbol}"),
        # ValueError, the same traceback
        ("{symbol.csv", "expected '}' before end of string: the only placeholder is {symbol}"),
        ("{symbol}}.csv", "Single '}' encountered in format string: the only placeholder is {symbol}"),
    ],
)
def test_a_file_name_with_a_placeholder_other_than_symbol_is_refused(
    tmp_path: Path, pattern: str, reason: str
) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "files.yaml"
    path.write_text(
        "universe: {symbols: [AAA]}\nmonths: 1\ntimeframes: [1d]\n"
        f"source: {{kind: files, path: data, daily: '{pattern}'}}\n"
    )
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    assert line == f"refresher: {path}: source.daily={pattern!r}: {reason}"


@pytest.mark.parametrize(
    ("source", "named"),
    [
        # "source.dsn=None: Field required (+1 more error)": not a word of the key the user did write
        (
            "{kind: postgres, dns: 'host=upstream'}",
            "source.dns='host=upstream': unknown field (did you mean dsn?)",
        ),
        ("{kind: files, pth: data}", "source.pth='data': unknown field (did you mean path?)"),
    ],
)
def test_a_required_field_misspelled_is_named_as_written(tmp_path: Path, source: str, named: str) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(f"universe: {{symbols: [AAA]}}\nmonths: 1\nsource: {source}\n")
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    assert line == f"refresher: {path}: {named} (+1 more error)"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        # an unclosed `[` is found on the next line: the line and its text, and where the sequence began
        (
            "universe: {symbols: [AAA}\nmonths: 3\n",
            "line 1, column 25='universe: {symbols: [AAA}': invalid YAML: did not find expected ',' or ']'",
        ),
        (
            "universe: {symbols: [AAA]\nmonths: 3\n",
            "line 2, column 1='months: 3': invalid YAML: did not find expected ',' or '}' "
            "(while parsing a flow mapping on line 1)",
        ),
        # a tab before a key: the line is shown without its blanks
        (
            "universe: {symbols: [AAA]}\nmonths: 3\n\tseed: 1\n",
            "line 3, column 1='seed: 1': invalid YAML: found a tab character that violates indentation",
        ),
        # stopped at the file's end (`line 3=None` before): the line the unclosed quote began on
        (
            'universe: {symbols: [AAA]}\nmonths: "3\n',
            "line 2, column 9='months: \"3': invalid YAML: found unexpected end of stream "
            "(while scanning a quoted scalar)",
        ),
        # the line shown holds a source's DSN: its password is not
        (
            "universe: {symbols: [AAA]}\nmonths: 3\nsource: {kind: postgres, dsn: postgresql://u:s3cret@h/db\n",
            "line 3, column 9='source: {kind: postgres, dsn: postgresql://u:***@h/db': invalid YAML: did not find",
        ),
        (
            "universe: {symbols: [AAA]}\nmonths: 3\nsource: {kind: postgres, dsn: host=h password=s3cret dbname=x\n",
            "line 3, column 9='source: {kind: postgres, dsn: host=h password=*** dbname=x': invalid YAML: did not",
        ),
    ],
)
def test_invalid_yaml_names_the_line_its_text_and_where_the_construct_began(
    tmp_path: Path, body: str, named: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(body)
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    assert f"{path}: {named}" in line, line
    assert "s3cret" not in line and "=None" not in line, line


def test_a_universe_written_as_a_list_says_where_the_names_go(tmp_path: Path) -> None:
    path = tmp_path / "listed.yaml"
    path.write_text("universe: [AAA, BBB]\nmonths: 3\n")
    line = plan(tmp_path, path, "--as-of", "2024-01-31")
    assert (
        f"{path}: universe=['AAA', 'BBB']: must be a mapping of fields: write the names under `symbols:`"
        in line
    )
