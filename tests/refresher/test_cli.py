"""The CLI's promises about bad input: one line naming file, field and value, exit status 2, no traceback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refresher.cli import main


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refresher.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_unknown_profile_is_one_line_exit_2(tmp_path: Path) -> None:
    line = one_line_error(run_cli("plan", "--profile", "no_such_profile", "--state-dir", str(tmp_path)))
    assert "no_such_profile" in line and "ui_testing" in line  # names the value and the choices


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("universe: {symbols: [AAA]}\nexchange: XNYZ\nmonths: 1\n", "exchange", "XNYZ"),
        ("universe: {symbols: [AAA]}\nmonths: 1\nfeatures: [dashbord_data]\n", "features", "dashbord_data"),
        ("universe: {symbols: [AAA]}\nmonths: -3\n", "months", "-3"),
        ("universe: {symbols: [AAA]}\nmonths: 1\ntimeframes: [5m]\n", "timeframes", "5m"),
        ("universe: {symbols: [AAA]}\nmonths: 1\ncolour: blue\n", "colour", "blue"),
    ],
)
def test_bad_profile_field_names_file_field_and_value(
    tmp_path: Path, text: str, field: str, value: str
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    line = one_line_error(run_cli("plan", "--profile", str(path), "--state-dir", str(tmp_path / "state")))
    assert str(path) in line and field in line and value in line
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("pgdata"))


def test_market_status_json_and_bad_exchange(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["market", "status", "--exchange", "XNYS", "--at", "2025-07-03T16:59:00Z", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["is_open"] is True  # the early close of 3 July 2025 is 13:00 New York = 17:00 UTC
    assert main(["market", "status", "--exchange", "XNYS", "--at", "2025-07-03T17:00:00Z", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["is_open"] is False
    line = one_line_error(run_cli("market", "status", "--exchange", "XXXX"))
    assert "XXXX" in line


def test_reset_without_a_server_says_to_refresh_first(tmp_path: Path) -> None:
    line = one_line_error(
        run_cli(
            *("reset", "--profile", "ui_testing", "--engine", "local", "--state-dir", str(tmp_path)),
            env={k: v for k, v in os.environ.items() if k != "MAKELEVEL"},  # under `make test`, make's words
        )
    )
    assert "refresher refresh --profile ui_testing" in line


def test_profiles_lists_the_shipped_four(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)["profiles"]}
    assert {"patterns", "backtesting", "ui_testing", "etf_analysis"} <= names


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "101"])
def test_a_bad_pool_size_is_one_line_exit_2_naming_the_flag_or_variable(tmp_path: Path, value: str) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    line = one_line_error(run_cli("refresh", "--profile", "ui_testing", *state, f"--pool-size={value}"))
    assert "--pool-size" in line and repr(value) in line
    env = {**os.environ, "REFRESHER_POOL_SIZE": value}
    line = one_line_error(run_cli("refresh", "--profile", "ui_testing", *state, env=env))
    assert line == f"refresher: REFRESHER_POOL_SIZE={value!r}: not a whole number from 0 to 100, nor auto"
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_refresh_help_offers_pool_size_auto() -> None:
    done = run_cli("refresh", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--pool-size N|auto" in text and "Default (auto, which also forgets a size chosen before)" in text


def test_fd_1_not_pointed_at_stderr_leaves_no_copy_of_it_open(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.dup(1) succeeded and os.dup2(2, 1) failed: the command goes on with Python's stdout alone, and the copy
    # of fd 1 is closed, not left open for the life of the process (a worker's).
    from refresher import cli

    copies: list[int] = []
    real_dup = os.dup

    def dup(fd: int) -> int:
        copies.append(real_dup(fd))
        return copies[-1]

    def dup2(fd: int, fd2: int, inheritable: bool = True) -> int:
        raise OSError(errno.EBADF, "refused")

    with monkeypatch.context() as patch:
        patch.setattr(os, "dup", dup)
        patch.setattr(os, "dup2", dup2)
        with cli._stdout_on_stderr():
            [copy] = copies
            with pytest.raises(OSError):
                os.fstat(copy)
