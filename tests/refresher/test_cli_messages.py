"""What a new user reads: every usage error is one line, help says what the code does, plan touches nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refresher.cli import main
from refresher.engines.base import ServerInfo
from refresher.errors import ProfileError
from refresher.profile_files import find_profile_file
from refresher.settings import STATE_DIR_NAME, Settings, find_state_dir
from tests.refresher.test_cli import one_line_error, run_cli
from tests.refresher.test_pytest_plugin import read_only_dir

__all__ = ["read_only_dir"]  # the fixture, shared with test_pytest_plugin


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["plan", "--profile", "ui_testing", "--as-of", "yesterday"], ["--as-of", "'yesterday'"]),
        (["plan", "--profile", "ui_testing", "--engine", "bogus"], ["--engine", "'bogus'", "compose"]),
        (["refresh"], ["--profile"]),
        (["market", "status", "-x", "XNYS", "--at", "tomorrow"], ["--at", "'tomorrow'"]),
        (["no-such-command"], ["'no-such-command'"]),
        # Path(""), the current directory: a store or state dir made wherever the command ran
        (["plan", "--profile", "ui_testing", "--store", ""], ["--store", "empty", "''"]),
        (["plan", "--profile", "ui_testing", "--state-dir", ""], ["--state-dir", "empty", "''"]),
        (["plan", "--profile", "ui_testing", "--profiles-dir", " "], ["--profiles-dir", "empty", "' '"]),
    ],
)
def test_usage_errors_are_one_line_naming_option_and_value(args: list[str], names: list[str]) -> None:
    line = one_line_error(run_cli(*args))
    assert all(name in line for name in names), line
    assert "usage:" not in line
    assert line.count("--at") <= 1  # once: argparse names the option, the message does not repeat it


def test_lowercase_exchange_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["market", "status", "-x", "xnys", "--at", "2025-07-03T16:59:00Z", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exchange"] == "XNYS"


def test_help_states_that_a_naive_time_is_utc_and_what_plan_calls_stale() -> None:
    market = run_cli("market", "status", "--help").stdout
    assert "without a zone it is UTC" in " ".join(market.split())
    plan = " ".join(run_cli("plan", "--help").stdout.split())
    assert "stale" in plan and "--prune" in plan
    # The plan table's columns are the words the help uses.
    assert "prune" not in plan.split("stale")[0].split("Print what")[1]


def test_naive_time_is_utc(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["market", "status", "-x", "XNYS", "--at", "2025-07-03T16:59:00", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["at"] == "2025-07-03T16:59:00+00:00"


def test_plan_creates_no_store_and_no_state(tmp_path: Path) -> None:
    store, state = tmp_path / "store", tmp_path / "state"
    done = run_cli(
        "plan", "-p", "ui_testing", "--engine", "local", "--store", str(store), "--state-dir", str(state)
    )
    assert done.returncode == 0, done.stderr
    assert "to_fetch" in done.stdout
    assert not store.exists() and not state.exists()


def test_profiles_lists_invalid_ones_with_their_error_and_full_names(tmp_path: Path) -> None:
    long_name = "a_profile_name_long_enough_to_be_truncate"  # 41 characters, the most a name may have
    (tmp_path / f"{long_name}.yaml").write_text("universe: {symbols: [AAA]}\nmonths: 1\n")
    (tmp_path / "broken.yaml").write_text("universe: {symbols: [AAA]}\nmonths: -3\n")
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin", "REFRESHER_PROFILES": str(tmp_path)}
    done = run_cli("profiles", env=env)
    assert done.returncode == 0, done.stderr
    assert long_name in done.stdout
    invalid = [line for line in done.stdout.splitlines() if "broken.yaml" in line]
    assert len(invalid) == 1 and "months" in invalid[0] and "-3" in invalid[0]
    listing = json.loads(run_cli("profiles", "--json", env=env).stdout)
    assert [e["path"] for e in listing["invalid"]] == [str(tmp_path / "broken.yaml")]
    assert long_name in {p["name"] for p in listing["profiles"]}


def test_state_dir_is_found_like_git_finds_dot_git(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    deep = checkout / "tests" / "unit"
    deep.mkdir(parents=True)
    assert find_state_dir(deep) == checkout / STATE_DIR_NAME  # none yet: the checkout's root
    (checkout / "tests" / STATE_DIR_NAME).mkdir()
    assert find_state_dir(deep) == checkout / "tests" / STATE_DIR_NAME  # the nearest existing one wins
    (tmp_path / STATE_DIR_NAME).mkdir()  # above the checkout: not the checkout's
    assert find_state_dir(checkout / "docs") == checkout / STATE_DIR_NAME
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert find_state_dir(outside) == tmp_path / STATE_DIR_NAME  # outside a checkout the nearest one wins
    env = {"REFRESHER_STATE_DIR": str(tmp_path / "pinned")}
    assert Settings.from_env(env).state_dir == tmp_path / "pinned"


def test_status_prints_the_state_dir_found_from_a_subdirectory(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "docs").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [*run_cli_argv(), "status", "--json"], cwd=checkout / "docs", env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state_dir"] == str(checkout / STATE_DIR_NAME)


def run_cli_argv() -> list[str]:
    import sys

    return [sys.executable, "-m", "refresher.cli"]


def test_pytest_fixture_bad_profile_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "test_bad.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.refresher_profile('no_such_profile')\n"
        "def test_it(refresher_db):\n"
        "    pass\n"
    )
    done = subprocess.run(
        [*run_cli_argv()[:1], "-m", "pytest", "-q", str(tmp_path / "test_bad.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stdout and "raise " not in done.stdout, done.stdout
    assert "refresher: " in done.stdout and "no_such_profile" in done.stdout


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("as_of: 2025-02-30\n", ["as_of='2025-02-30'", "day value"]),  # PyYAML's ValueError was a traceback
        ("start: 2025-13-01\nend: 2025-12-31\n", ["start='2025-13-01'", "month"]),
        ("months: abc\n", ["months='abc'"]),
        ("months: 2\nbogus: 1\n", ["bogus=1"]),
    ],
)
def test_a_profile_file_with_a_bad_field_is_one_line_naming_file_field_and_value(
    tmp_path: Path, body: str, names: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("universe: {symbols: [AAA]}\n" + body)
    line = one_line_error(run_cli("plan", "--profile", str(path), "--state-dir", str(tmp_path / "state")))
    assert str(path) in line and all(name in line for name in names), line
    env = {"PATH": "/usr/bin:/bin", "REFRESHER_PROFILES": str(tmp_path)}
    listing = json.loads(run_cli("profiles", "--json", env=env).stdout)
    assert [e["path"] for e in listing["invalid"]] == [str(path)]


@pytest.mark.parametrize("command", ["url", "reset", "down"])
def test_a_misspelled_profile_without_a_server_lists_the_known_ones(tmp_path: Path, command: str) -> None:
    """`make down PROFILE=ui_testin` said "nothing to stop" with status 0 while ui_testing kept running, and
    `url`/`reset` said to refresh the misspelled name: each is one line listing the profiles, status 2."""
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    line = one_line_error(run_cli(command, "--profile", "ui_testin", "--state-dir", str(tmp_path), env=env))
    assert "'ui_testin'" in line and "no such profile" in line and "ui_testing" in line, line


@pytest.mark.parametrize("command", ["url", "reset"])
def test_a_profile_without_a_server_is_refused_in_find_profile_files_own_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """`_no_server` hands on the error find_profile_file raised, never another it makes up: with a file named
    ``ui_testin`` in the working directory the name is neither a profile name nor a .yaml file, which it says,
    not that no profile is so named."""
    (tmp_path / "ui_testin").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError) as info:
        find_profile_file("ui_testin", [])
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", command, "--profile", "ui_testin", "--state-dir", "state"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one_line_error(done) == f"refresher: {info.value}"


@pytest.mark.parametrize(
    ("makelevel", "hint"), [("1", "make refresh PROFILE=ui_testing"), (None, "refresher")]
)
def test_url_without_a_server_says_how_to_start_it_in_the_users_words(
    tmp_path: Path, makelevel: str | None, hint: str
) -> None:
    """Under `make url` the hint is the make target (`refresher` is not on a new user's PATH), as refresh's own
    `with password: make url ...` line is."""
    env = {k: v for k, v in os.environ.items() if k != "MAKELEVEL"}
    env["DOCKER_HOST"] = "unix:///nonexistent.sock"
    if makelevel:
        env["MAKELEVEL"] = makelevel
    line = one_line_error(run_cli("url", "--profile", "ui_testing", "--state-dir", str(tmp_path), env=env))
    assert f"`{hint}" in line, line


def test_a_read_only_store_or_state_dir_names_the_setting_that_moves_it(
    tmp_path: Path, read_only_dir: Path
) -> None:
    """The store's path said "point REFRESHER_STATE_DIR", which does not move the store."""
    store = run_cli("warm", "--profile", "ui_testing", "--as-of", "2025-03-31", "--store", str(read_only_dir))
    line = one_line_error(store)
    assert line.startswith(f"refresher: {read_only_dir}") and "FEATURE_STORE_PATH" in line, line
    assert "REFRESHER_STATE_DIR" not in line
    state = run_cli(
        "refresh", "--profile", "ui_testing", "--engine", "local", "--as-of", "2025-03-31",
        "--state-dir", str(read_only_dir), "--store", str(tmp_path / "store"),
    )  # fmt: skip
    line = one_line_error(state)
    assert line.startswith(f"refresher: {read_only_dir}") and "REFRESHER_STATE_DIR" in line, line
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_reset_after_a_refresh_stopped_before_its_snapshot_says_to_finish_it() -> None:
    """A Ctrl-C'd first refresh leaves a server without a pristine snapshot; reset said "run `refresher
    refresh` first" with no profile (and no make words under make): it names the profile and the command."""
    from refresher.engines.local import LocalEngine
    from tests.fixtures_postgres import world_traversable_tmp

    state = world_traversable_tmp("cli-nosnap-")
    engine = LocalEngine(state)
    engine.start("ui_testing")  # a server, as the interrupted refresh left it: nothing loaded, no snapshot
    try:
        env = {k: v for k, v in os.environ.items() if k != "MAKELEVEL"}
        line = one_line_error(run_cli("reset", "-p", "ui_testing", "--state-dir", str(state), env=env))
        assert "`refresher refresh --profile ui_testing`" in line and "snapshot" in line, line
        line = one_line_error(
            run_cli("reset", "-p", "ui_testing", "--state-dir", str(state), env={**env, "MAKELEVEL": "1"})
        )
        assert "`make refresh PROFILE=ui_testing`" in line, line
    finally:
        engine.stop("ui_testing")


def test_a_profile_name_in_the_wrong_case_lists_the_known_ones(tmp_path: Path) -> None:
    """`make refresh PROFILE=UI_testing` said only which pattern names match; a typo's line lists the profiles,
    as a misspelling's does."""
    line = one_line_error(run_cli("plan", "--profile", "UI_testing", "--state-dir", str(tmp_path)))
    assert "'UI_testing'" in line and "ui_testing" in line.replace("'UI_testing'", ""), line


@pytest.mark.parametrize("command", ["url", "reset", "down"])
def test_url_reset_down_of_a_name_in_the_wrong_case_list_the_known_ones(tmp_path: Path, command: str) -> None:
    """`make url PROFILE=UI_testing` said only which pattern names match, where plan and refresh list them."""
    (tmp_path / "local").mkdir()  # a state dir the local engine has used: it is asked first
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    line = one_line_error(run_cli(command, "--profile", "UI_testing", "--state-dir", str(tmp_path), env=env))
    assert "'UI_testing'" in line and "ui_testing" in line.replace("'UI_testing'", ""), line


def test_status_of_a_misspelled_profile_lists_the_known_ones(tmp_path: Path) -> None:
    """`refresher status --profile ui_testin` answered an empty table, status 0 (with a store, the profile's
    parse refused it): a name that is neither a profile nor a server lists the profiles, as url/reset/down do."""
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}
    state = ["--state-dir", str(tmp_path), "--store", str(tmp_path / "store")]
    line = one_line_error(run_cli("status", "--profile", "ui_testin", *state, env=env))
    assert "'ui_testin'" in line and "no such profile" in line and "ui_testing" in line, line
    done = run_cli("status", "--profile", "ui_testing", "--json", *state, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["servers"] == []


@pytest.mark.parametrize(
    ("command", "says"),
    [("reset", "run the reset again"), ("down", "run the down again"), ("url", "interrupted")],
)
def test_an_interrupted_command_says_what_it_left_in_its_own_words(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    says: str,
) -> None:
    """A Ctrl-C of a reset or a down said 'every finished segment is kept, run again to resume': there are no
    segments to resume, and the user went looking for a load."""
    from refresher import commands

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, command, interrupted)
    assert main([command, "--profile", "ui_testing", "--state-dir", str(tmp_path)]) == 130
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("refresher: interrupted") and says in line and "segment" not in line, line


# A command that loses its server inside a psycopg pipeline, as a `reset` did beside a `down`: run in a process of
# its own, where logging has no handler but its last resort (pytest's own logging plugin hides it in-process).
_LOST_MID_PIPELINE = """
import sys, psycopg
from refresher import cli, commands

def lost(settings, name, **_):
    with (
        commands._database_errors(name),
        psycopg.connect(sys.argv[1], autocommit=True) as conn,
        psycopg.connect(sys.argv[1], autocommit=True) as other,
        conn.pipeline(),
    ):
        conn.execute("SELECT 1")
        other.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        conn.execute("SELECT 2")  # queued: the pipeline's exit has it to finish
        conn.execute("SELECT pg_sleep(1)").fetchone()

commands.url = lost
sys.exit(cli.main(["url", "--profile", "ui_testing", "--state-dir", sys.argv[2]]))
"""


def test_a_server_lost_mid_pipeline_is_one_line_without_psycopgs_warnings(
    tmp_path: Path, pg_database: ServerInfo
) -> None:
    """A `down` beside a `reset` ended the reset's session in its pipeline: the reset's one line came after four
    lines of psycopg's logger ('error ignored terminating <psycopg.Pipeline [BAD] ...>: consuming input
    failed: server closed the connection unexpectedly ...'), printed by logging's last-resort handler."""
    done = subprocess.run(
        [sys.executable, "-c", _LOST_MID_PIPELINE, pg_database.dsn(), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_error(done)
    assert line.startswith("refresher: profile ui_testing: lost the database server"), line
