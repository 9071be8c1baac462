"""A first refresh as a new user runs it: piped output still shows progress, and the printed hint works."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_postgres import found, world_traversable_tmp
from tests.unprivileged import as_nobody, nobody_ids, nobody_state

PROFILE = """\
universe:
  symbols: [AAPL, KO]
exchange: XNYS
months: 2
as_of: 2025-03-31
timeframes: [1d, 1m]
features: []
"""

CONSOLE_SCRIPT = Path(sys.executable).parent / "refresher"


@pytest.fixture
def workspace() -> Iterator[Path]:
    root = world_traversable_tmp("refresher-firstrun-")
    (root / "profiles").mkdir()
    (root / "profiles" / "firstrun.yaml").write_text(PROFILE)
    try:
        yield root
    finally:
        subprocess.run(
            # By name, never `all`: that would reach other checkouts' Docker servers on this daemon.
            [CONSOLE_SCRIPT, "down", "--profile", "firstrun", "--state-dir", str(root / "state")],
            capture_output=True,
            timeout=120,
        )


@pytest.mark.slow
def test_piped_refresh_prints_progress_lines_and_a_hint_that_works_in_a_clean_shell(workspace: Path) -> None:
    # The user's shell: no .venv/bin on PATH, not run by make.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workspace),
        "FEATURE_STORE_PATH": str(workspace / "store"),
        "REFRESHER_PROFILES": str(workspace / "profiles"),
        # the checkout under test, when it is not the one installed
        **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
    }
    done = subprocess.run(
        [
            CONSOLE_SCRIPT,
            "refresh",
            "-p",
            "firstrun",
            "--engine",
            "local",
            "--state-dir",
            str(workspace / "state"),
        ],
        env=env,
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("refresher: load ")]
    assert progress, done.stderr
    # 2 symbols x 2 months x 2 timeframes; the rate appears once a second has passed.
    last = r"refresher: load 8/8 segments \(100%\), [\d,]+ rows(, [\d,]+ rows/s)?, \d+ s"
    assert re.fullmatch(last, progress[-1]), progress
    assert "\x1b[" not in done.stderr  # plain lines for a log, no terminal control sequences

    hint = next(line for line in done.stdout.splitlines() if line.startswith("with password: "))
    command = hint.removeprefix("with password: ")
    assert shlex.split(command)[0] == str(CONSOLE_SCRIPT)  # not on PATH here, so the full path
    clean = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={workspace}", "sh", "-c", command + " --json"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clean.returncode == 0, clean.stderr
    # The DSN printed has no password (psql asked for one the user does not know): the psql line works as is.
    connect = next(line for line in done.stdout.splitlines() if line.startswith("psql: "))
    psql = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={workspace}", "sh", "-c", connect.removeprefix("psql: ")],
        input="SELECT count(*) FROM symbols;\n",
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert psql.returncode == 0 and " 2\n" in psql.stdout, psql.stderr
    url = json.loads(clean.stdout)
    assert url["profile"] == "firstrun"
    assert url["dsn"].startswith("postgresql://") and ":" in url["dsn"].split("@")[0].removeprefix(
        "postgresql://"
    )

    state = workspace / "state"
    assert found(state, "*.lock")  # the refresh and the engine took their locks
    down = subprocess.run(
        [CONSOLE_SCRIPT, "down", "--profile", "firstrun", "--state-dir", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0 and "firstrun" in down.stdout, down.stderr
    assert found(state, "*.lock") == []  # no empty lock files left behind


@pytest.mark.slow
def test_the_url_hint_of_a_refresh_of_a_profile_given_as_a_path_works(workspace: Path) -> None:
    # `refresh --profile /tmp/.../pathy.yaml` printed `url --profile /tmp/.../pathy.yaml`, which url refused
    # ("profile names must match ..."): the hint names the profile, as the server and `url` know it.
    path = workspace / "elsewhere" / "pathy.yaml"
    path.parent.mkdir()
    path.write_text(PROFILE)
    env = {k: v for k, v in os.environ.items() if k != "MAKELEVEL"}
    state = workspace / "state"
    refresh = [CONSOLE_SCRIPT, "refresh", "-p", str(path), "--engine", "local", "--state-dir", str(state)]
    try:
        # the full refresh, then the one the stamp proves has nothing to do: each prints the hint
        for _ in range(2):
            done = subprocess.run(refresh, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
            hint = next(line for line in done.stdout.splitlines() if line.startswith("with password: "))
            command = hint.removeprefix("with password: ")
            assert str(path) not in command, command
            url = subprocess.run(
                ["sh", "-c", command + " --json"], env=env, capture_output=True, text=True, timeout=120
            )
            assert url.returncode == 0, url.stderr
            assert json.loads(url.stdout)["profile"] == "pathy"
    finally:
        subprocess.run(
            [CONSOLE_SCRIPT, "down", "--profile", "pathy", "--state-dir", str(state)],
            env=env,
            capture_output=True,
            timeout=120,
        )


def test_json_output_of_url_is_an_object_or_a_one_line_error(tmp_path: Path) -> None:
    name = f"nothing_{uuid.uuid4().hex[:6]}"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / f"{name}.yaml").write_text(PROFILE)  # a profile, without a server
    args = ["url", "-p", name, "--json", "--state-dir", str(tmp_path / "state")]
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", *args, "--profiles-dir", str(tmp_path / "profiles")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MAKELEVEL"},  # `make test`: the hint is refresher's
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"refresher refresh --profile {name}" in done.stderr


@pytest.mark.slow
def test_down_as_a_user_beside_a_lock_file_of_another_user_stops_its_server_and_says_so() -> None:
    # Root ran `make refresh` in the checkout first (docker, as root may), then its owner, outside the docker
    # group, refreshed on the local engine: `down` stopped the local server, then failed on root's docker lock
    # file ("Permission denied; point --state-dir ..."), exit 2, and never said what it had stopped.
    from refresher import commands
    from refresher.engines.local import LocalEngine
    from refresher.settings import Settings

    root, state = nobody_state("refresher-down-user-")
    engine = LocalEngine(state)

    def start() -> str:
        return engine.start("downer").dsn()

    def down() -> str:
        settings = Settings.from_env(state_dir=state, store_root=root / "store", engine="local")
        return repr(commands.down(settings, "downer").stopped)

    try:
        assert as_nobody(start).startswith("postgresql://")
        theirs = state / "docker"
        theirs.mkdir()
        (theirs / ".downer.lock").touch(0o444)  # not openable for writing by this user, as root's 644 is not
        theirs.chmod(0o555)
        assert as_nobody(down) == "['local:downer']"
        assert engine.info("downer") is None
        assert (theirs / ".downer.lock").exists()  # not this user's to remove
    finally:
        as_nobody(lambda: str(engine.stop("downer")))


@pytest.mark.slow
def test_a_refresh_into_a_store_this_user_cannot_write_starts_no_server() -> None:
    # A store shared with root (made by a refresh as root): the refresh's one-line error came from its plan,
    # which runs beside the new server's start, so a Postgres with an empty database stayed running behind it.
    from featurestore import FeatureStore, StoreNotWritable
    from refresher import commands
    from refresher.engines.local import LocalEngine
    from refresher.settings import Settings

    root = world_traversable_tmp("refresher-store-user-")
    (root / "profiles").mkdir()
    (root / "profiles" / "firstrun.yaml").write_text(PROFILE)
    for mine in ("state", "cache"):
        (root / mine).mkdir()
        os.chown(root / mine, *nobody_ids())
    FeatureStore(root / "store")  # root's (or, not root, made read-only below)
    settings = Settings.from_env(
        state_dir=root / "state",
        store_root=root / "store",
        profiles_dirs=(root / "profiles",),
        engine="local",
        cache_dir=root / "cache",
    )

    commands.plan(settings, "firstrun")  # imports what the refresh needs: nobody may not read the stdlib
    store_paths = [root / "store", *(root / "store").iterdir()]
    if os.geteuid() != 0:
        for path in store_paths:
            path.chmod(0o555 if path.is_dir() else 0o444)

    def refresh() -> str:
        try:
            commands.refresh(settings, "firstrun")
        except StoreNotWritable as exc:
            return f"refused: {exc}"
        return "refreshed"

    engine = LocalEngine(root / "state")
    try:
        answer = as_nobody(refresh)
        assert answer.startswith("refused: ") and "Permission denied" in answer, answer
        assert engine.info("firstrun") is None
        assert not (root / "state" / "local" / "firstrun").exists()
    finally:
        as_nobody(lambda: str(engine.stop("firstrun")))
        for path in store_paths:  # removable again at the session's end
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.slow
def test_a_refresh_of_a_files_source_without_its_directory_starts_no_server(workspace: Path) -> None:
    # source.path misspelled (or the mount not there): the error came from the first fetch, which runs beside a
    # new server's start, so an empty Postgres stayed running (`status`: no snapshot); nor did it name the profile
    profile = workspace / "profiles" / "mine.yaml"
    profile.write_text(PROFILE + "source: {kind: files, path: ../market_dta}\n")
    where = ["--state-dir", str(workspace / "state")]
    refresh = ["refresh", "--profile", str(profile), "--engine", "local", "--store", str(workspace / "store")]
    left = ""
    try:
        done = subprocess.run(
            [CONSOLE_SCRIPT, *refresh, *where],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:  # what the refresh left, if it started a server
        down = [CONSOLE_SCRIPT, "down", "--profile", "mine", *where]
        left = subprocess.run(down, capture_output=True, text=True, timeout=120).stdout
    assert done.returncode == 2 and done.stderr.strip() == (
        f"refresher: {profile}: source.path={str(workspace / 'market_dta')!r}: no such directory"
    ), done.stderr
    assert "stopped" not in left, left
