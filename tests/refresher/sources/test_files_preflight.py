"""A files source whose directory or pattern matches no file at all is refused before anything is written, by
``refresh``, ``plan`` and ``warm`` alike, in one line naming the setting; some files missing stays a note."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest

from refresher.errors import SourceError
from refresher.segments import Segment
from refresher.sources.files import FilesSource
from tests.refresher.test_cli import one_line_error, run_cli

from .conftest import MakeProfile

NOV = dt.date(2024, 11, 1)
DAILY = "Date,Open,High,Low,Close,Volume\n2024-11-26,10,11,9,10.5,1000\n"


def profile_text(path: Path | str, daily: str = "daily/{symbol}.csv") -> str:
    return f"""\
universe: {{symbols: [AAPL, MSFT, KO]}}
start: 2024-10-01
end: 2024-11-29
timeframes: [1d]
source: {{kind: files, path: '{path}', daily: '{daily}'}}
"""


def no_file_line(profile: Path, root: Path) -> str:
    return (
        f"{profile}: source.daily='daily/{{symbol}}.csv': no file matches it under source.path='{root}' for any "
        f"of the 3 symbols (e.g. {root / 'daily' / 'AAPL.csv'}); fix source.path or source.daily, or leave 1d out "
        "of timeframes"
    )


def test_a_pattern_no_file_matches_is_refused_naming_it(tmp_path: Path, make_profile: MakeProfile) -> None:
    # every segment loaded empty, each with a note 'no such file', and the refresh exited 0
    (tmp_path / "data" / "daily").mkdir(parents=True)
    (tmp_path / "data" / "daily" / "AAPL.parquet").write_text("")  # another name than the pattern's
    src = FilesSource(make_profile(profile_text(tmp_path / "data")))
    with pytest.raises(SourceError) as info:
        src.preflight()
    assert str(info.value) == no_file_line(tmp_path / "test.yaml", tmp_path / "data")


def test_some_files_missing_stay_notes(tmp_path: Path, make_profile: MakeProfile) -> None:
    (tmp_path / "daily").mkdir()
    (tmp_path / "daily" / "KO.csv").write_text(DAILY)  # the last symbol's file alone
    src = FilesSource(make_profile(profile_text(tmp_path)))
    src.preflight()
    assert src.fetch(Segment("AAPL", "1d", NOV)).num_rows == 0
    assert [report.reason for report in src.reports] == ["no such file"]


def test_files_in_another_case_alone_are_named_with_the_rename(
    tmp_path: Path, make_profile: MakeProfile
) -> None:
    (tmp_path / "daily").mkdir()
    (tmp_path / "daily" / "msft.csv").write_text(DAILY)
    src = FilesSource(make_profile(profile_text(tmp_path)))
    with pytest.raises(
        SourceError, match=r"no such file for MSFT, but msft.csv is there .* rename it to MSFT.csv"
    ):
        src.preflight()


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    where = ["--state-dir", str(tmp_path / "state"), "--store", str(tmp_path / "store")]
    return run_cli(*args, "--profile", str(tmp_path / "p.yaml"), *where)


def test_plan_refuses_a_missing_directory_as_a_refresh_does(tmp_path: Path) -> None:
    # `plan` printed a plan of every segment to load and exited 0
    (tmp_path / "p.yaml").write_text(profile_text("market_dta"))
    line = one_line_error(cli(tmp_path, "plan"))
    assert line == (
        f"refresher: {tmp_path / 'p.yaml'}: source.path='{tmp_path / 'market_dta'}': no such directory"
    )


@pytest.mark.parametrize("command", ["plan", "warm", "refresh"])
def test_no_file_matching_is_one_line_and_writes_nothing(tmp_path: Path, command: str) -> None:
    (tmp_path / "data" / "daily").mkdir(parents=True)
    (tmp_path / "p.yaml").write_text(profile_text("data"))
    args = [command, "--engine", "local"] if command == "refresh" else [command]
    try:
        line = one_line_error(cli(tmp_path, *args))
    finally:  # a refresh that went ahead started a server
        run_cli("down", "--profile", "p", "--state-dir", str(tmp_path / "state"))
    assert line == f"refresher: {no_file_line(tmp_path / 'p.yaml', tmp_path / 'data')}"
    # no segment stored (warm and refresh open the store first), no server made
    assert not [p for p in (tmp_path / "store").glob("data/**/*") if p.is_file()]
    assert not list((tmp_path / "state").glob("*/*.pid"))
