"""A source file that is there but cannot be read (a link to nowhere or to itself, a directory, a mode that keeps
the user out, a .gz that is no gzip) is one line naming the file and the profile's setting, never a traceback,
and the database a refresh found is left as it was."""

from __future__ import annotations

import datetime as dt
import gzip
import os
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from refresher.errors import RefresherError, SourceError
from refresher.segments import Segment
from refresher.sources import make_source
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.sources.test_bad_rows_cli import CHECKSUM, CLEAN, END, PROFILE, START
from tests.refresher.test_refresh_e2e import Workspace
from tests.unprivileged import as_nobody

from .conftest import MakeProfile

NOV = dt.date(2024, 11, 1)
AAPL_CSV = "\n".join([CLEAN[0], *(line for line in CLEAN if line.startswith("AAPL,"))]) + "\n"


def per_symbol(tmp_path: Path, daily: str) -> str:
    return f"""\
universe: {{symbols: [AAPL, MSFT]}}
start: 2024-10-01
end: 2024-11-29
timeframes: [1d]
source: {{kind: files, path: {tmp_path}, daily: '{daily}'}}
"""


def link_to_itself(path: Path) -> None:
    path.symlink_to(path.name)


def link_to_nowhere(path: Path) -> None:
    path.symlink_to("AAPL-2024.csv")


def directory(path: Path) -> None:
    path.mkdir()


def named_pipe(path: Path) -> None:
    os.mkfifo(path)


# what stands where the profile names AAPL's file -> the reason the line gives
IN_THE_WAY: dict[str, tuple[Callable[[Path], None], str]] = {
    # a traceback: OSError 'Too many levels of symbolic links' from the version's stat
    "a link to itself": (link_to_itself, "Too many levels of symbolic links"),
    # read as a missing file: an empty segment and a note (a link into a share not mounted)
    "a link to nowhere": (link_to_nowhere, "a symbolic link to 'AAPL-2024.csv', which does not exist"),
    # "no such file for AAPL, but AAPL.csv is there ... rename it to AAPL.csv", about the name the profile gives
    "a directory": (directory, "a directory, not a file"),
    "a named pipe": (named_pipe, "not a regular file"),
}


@pytest.mark.parametrize("case", IN_THE_WAY)
def test_what_is_in_the_way_of_a_file_is_one_line(
    tmp_path: Path, make_profile: MakeProfile, case: str
) -> None:
    make, reason = IN_THE_WAY[case]
    make(tmp_path / "AAPL.csv")
    (tmp_path / "MSFT.csv").write_text(AAPL_CSV.replace("AAPL", "MSFT"))
    src = make_source(make_profile(per_symbol(tmp_path, "{symbol}.csv")))
    expected = f"{tmp_path / 'AAPL.csv'}: cannot read it (source.daily='{{symbol}}.csv'): {reason}"
    with pytest.raises(SourceError) as planned:
        src.versions([Segment("AAPL", "1d", NOV)])  # where a refresh meets it first: its plan
    with pytest.raises(SourceError) as fetched:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(planned.value) == str(fetched.value) == expected
    assert planned.value.fields == {
        "file": str(tmp_path / "AAPL.csv"),
        "field": "source.daily",
        "value": "{symbol}.csv",
    }
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 20  # the others read as before
    assert src.reports == []


def test_a_file_where_the_pattern_names_a_directory_is_one_line(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    # a traceback: NotADirectoryError from the version's stat
    (tmp_path / "daily").write_text(AAPL_CSV)
    src = make_source(make_profile(per_symbol(tmp_path, "daily/{symbol}.csv")))
    with pytest.raises(SourceError) as info:
        src.versions([Segment("AAPL", "1d", NOV)])
    assert str(info.value) == (
        f"{tmp_path / 'daily' / 'AAPL.csv'}: cannot read it (source.daily='daily/{{symbol}}.csv'): Not a directory"
    )


def test_a_gz_file_that_is_no_gzip_is_one_line(tmp_path: Path, make_profile: MakeProfile) -> None:
    # a traceback: OSError 'zlib inflate failed' from the look for another encoding
    (tmp_path / "AAPL.csv.gz").write_text(AAPL_CSV)
    (tmp_path / "MSFT.csv.gz").write_bytes(gzip.compress(AAPL_CSV.replace("AAPL", "MSFT").encode()))
    src = make_source(make_profile(per_symbol(tmp_path, "{symbol}.csv.gz")))
    with pytest.raises(SourceError) as info:
        src.fetch(Segment("AAPL", "1d", NOV))
    assert str(info.value) == (
        f"{tmp_path / 'AAPL.csv.gz'}: cannot read it (source.daily='{{symbol}}.csv.gz'): zlib inflate failed: "
        "incorrect header check (its name ends in .gz, so it is read as gzip: is it?)"
    )
    assert src.fetch(Segment("MSFT", "1d", NOV)).num_rows == 20


@pytest.mark.parametrize(
    ("file_mode", "directory_mode"),
    [(0o000, 0o755), (0o644, 0o000), (0o644, 0o644)],
    ids=["file closed", "directory closed", "directory not searchable"],
)
def test_a_file_its_user_may_not_read_is_one_line(
    make_profile: MakeProfile, file_mode: int, directory_mode: int
) -> None:
    # as most users run refresher (tests run as root, which reads any file): a traceback, PermissionError from
    # the stat (a directory closed to the user) or from pyarrow's open (a file closed to the user)
    root = world_traversable_tmp("refresher-modes-")
    data = root / "data"
    data.mkdir()
    (data / "AAPL.csv").write_text(AAPL_CSV)
    profile = make_profile(per_symbol(data, "{symbol}.csv"))
    segment = Segment("AAPL", "1d", NOV)

    def refresh_one() -> str:
        src = make_source(profile)
        try:
            src.versions([segment])
            return f"{src.fetch(segment).num_rows} rows"
        except RefresherError as exc:
            return str(exc)

    os.chmod(data / "AAPL.csv", file_mode)
    os.chmod(data, directory_mode)
    try:
        said = as_nobody(refresh_one)
    finally:
        os.chmod(data, 0o755)
    assert said == f"{data / 'AAPL.csv'}: cannot read it (source.daily='{{symbol}}.csv'): Permission denied"
    os.chmod(data / "AAPL.csv", 0o644)
    assert as_nobody(refresh_one) == "20 rows"


def held(ws: Workspace) -> tuple[str, str]:
    with psycopg.connect(ws.dsn()) as conn:
        row = conn.execute(CHECKSUM).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.slow
def test_a_file_in_the_way_through_the_cli_is_one_line_and_leaves_the_database_unchanged() -> None:
    ws = Workspace(world_traversable_tmp("refresher-status-"), "local", "file_status")
    (ws.root / "profiles" / "data").mkdir(parents=True)
    (ws.root / "profiles" / f"{ws.profile}.yaml").write_text(PROFILE.format(start=START, end=END))
    bars = ws.root / "profiles" / "data" / "bars.csv"
    bars.write_text("\n".join(CLEAN) + "\n")
    try:
        ws.run("refresh", "--profile", ws.profile)
        before = held(ws)
        bars.unlink()
        link_to_itself(bars)  # an export script's `ln -sf` gone wrong
        done = ws.run("refresh", "--profile", ws.profile, expect=2)
        assert done.stderr.splitlines() == [
            f"refresher: {bars}: cannot read it (source.daily='bars.csv'): Too many levels of symbolic links"
        ]
        assert held(ws) == before  # rows and ledger, loaded_at included
    finally:
        ws.down()
