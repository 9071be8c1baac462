"""``--json`` promises one JSON object on stdout: a failing command's too, for a script reading stdout alone
(``refresher plan --json | jq``), with the same one line on stderr and the same exit status as without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.refresher.test_cli import one_line_error, run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--profile", "no_such_profile"],  # a RefresherError
        ["plan", "--profile", "ui_testing", "--as-of", "0001-01-01"],  # a profile's field
        ["plan", "--profile", "ui_testing", "--as-of", "yesterday"],  # argparse: a bad value
        ["refresh", "--profile", "ui_testing", "--pool-size", "-1"],
        ["url", "--profile", "ui_testing"],  # no server
        ["market", "status", "--exchange", "XXXX"],
        ["market", "status", "--exchange", "XNYS", "--at", "1999-01-01T00:00:00Z"],
        ["status", "--profile", "ui_testing", "--bogus"],  # argparse: an unknown option
    ],
)
def test_a_failing_command_with_json_prints_its_error_as_json_on_stdout(
    tmp_path: Path, args: list[str]
) -> None:
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    state = ["--state-dir", str(tmp_path / "state"), "--store", str(tmp_path / "store")]
    plain = run_cli(*args, *state, env=env)
    line = one_line_error(plain)
    assert plain.stdout == ""
    done = run_cli(*args, *state, "--json", env=env)
    assert one_line_error(done) == line  # stderr, and the exit status, as without --json
    assert json.loads(done.stdout) == {"error": line.removeprefix("refresher: "), "exit_code": 2}


def test_a_bad_when_closed_is_named_before_redis_is_asked(tmp_path: Path) -> None:
    """With Redis down, `jobs submit --when-closed XXXX` said only that Redis could not be reached: the typo is
    named first, with no Redis asked (the port here has none)."""
    queue = "redis://127.0.0.1:1/0"
    done = run_cli("jobs", "submit", "--profile", "ui_testing", "--when-closed", "xxxx", "--queue", queue)
    line = one_line_error(done)
    assert "--when-closed" in line and "exchange='XXXX'" in line and "Redis" not in line, line
