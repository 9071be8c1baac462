"""The local engine after what users do around it: a server caught shutting down, the install that made a cluster
moved away, a damaged server.json, a state dir under a path pg_ctl's shell would mangle, a ``down`` killed while removing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from refresher.engines import _pgctl
from refresher.engines.local import REMOVING_INFIX, STOPPING, LocalEngine, Postmaster
from refresher.errors import EngineUnavailable
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.engines.test_local import KILLED_REMOVING, _kill_server_keep_data

pytestmark = pytest.mark.postgres


def _kept(info_dsn: str) -> object:
    with psycopg.connect(info_dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT answer FROM kept").fetchone()
    return row[0] if row else None


def test_a_start_while_the_server_shuts_down_waits_for_it_then_starts_it_again(engine: LocalEngine) -> None:
    # A `down` killed (or Ctrl-C'd) during its `pg_ctl stop`: the postmaster goes on shutting down. The next
    # refresh took it for the running server, polled logins it refused, and failed once it exited.
    info = engine.start("lr_stopping")
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    pgdata = engine.base / "lr_stopping" / "pgdata"
    postmaster = Postmaster.read(pgdata)
    assert postmaster is not None
    # The shutdown checkpoint holds the shutdown open until the checkpointer runs again.
    [checkpointer] = [
        child for child in psutil.Process(postmaster.pid).children() if "checkpointer" in _cmdline(child)
    ]
    checkpointer.suspend()
    os.kill(postmaster.pid, signal.SIGINT)  # what `pg_ctl stop -m fast` sends
    deadline = time.monotonic() + 30
    while (seen := Postmaster.read(pgdata)) is None or seen.status != STOPPING:
        assert time.monotonic() < deadline, "the postmaster never began its shutdown"
    resume = threading.Timer(1.0, checkpointer.resume)
    resume.start()
    try:
        again = engine.start("lr_stopping")
    finally:
        resume.join()
    assert _kept(again.dsn()) == 42
    running = Postmaster.read(pgdata)
    assert running is not None and running.pid != postmaster.pid and running.alive()


def _cmdline(proc: psutil.Process) -> str:
    """A postmaster child's command line; "" for one gone or a zombie (a backend just exited, not yet reaped)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _serving(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaps in a container without an init does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def moved_install() -> Path:
    """A path to the embedded PostgreSQL install that a test may remove (a checkout's venv, moved away)."""
    path = world_traversable_tmp("lr-install-") / "old-venv-bin"
    path.symlink_to(_pgctl.embedded_bin_dir())
    return path


def test_a_cluster_whose_install_is_gone_starts_and_stops_with_ours(
    engine: LocalEngine, moved_install: Path
) -> None:
    # server.json names the bin dir that made the cluster; a moved checkout or a removed venv takes it away.
    # Every start failed ("pg_ctl: no such program"), and so did `down` of a running server, left running.
    before = LocalEngine(engine.base.parent, bin_dir=moved_install)
    for profile in ("lr_moved_stopped", "lr_moved_running"):
        with psycopg.connect(before.start(profile).dsn()) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, "lr_moved_stopped")
    running = Postmaster.read(engine.base / "lr_moved_running" / "pgdata")
    assert running is not None
    moved_install.unlink()

    again = engine.start("lr_moved_stopped")
    assert _kept(again.dsn()) == 42
    _kill_server_keep_data(engine, "lr_moved_stopped")  # server.json now names ours
    assert _kept(engine.start("lr_moved_stopped").dsn()) == 42
    assert engine.stop("lr_moved_running")
    assert not _serving(running.pid)


def test_down_of_a_running_server_whose_state_file_is_damaged_stops_it(engine: LocalEngine) -> None:
    # The start's error says to run `refresher down`, which failed with that same error while the server ran.
    engine.start("lr_damaged")
    running = Postmaster.read(engine.base / "lr_damaged" / "pgdata")
    assert running is not None
    (engine.base / "lr_damaged" / "server.json").write_text("{half")
    assert engine.stop("lr_damaged")
    assert not _serving(running.pid)


@pytest.mark.parametrize("special", ['"', "$", "`"])
def test_a_state_dir_pg_ctl_would_mangle_is_refused_at_once_naming_it(special: str) -> None:
    # pg_ctl starts the server through /bin/sh, each path in double quotes: the server never ran, its log stayed
    # empty, and the start waited out its whole readiness timeout ("it never opened the port").
    state = world_traversable_tmp("lr-shell-") / f"my{special}checkout" / ".refresher"
    engine = LocalEngine(state, ready_timeout=5)
    with pytest.raises(EngineUnavailable, match=rf"cannot run a server under a path containing \{special}"):
        engine.start("lr_shell")
    assert not state.exists()  # nothing made that a later start would trust


def test_a_state_dir_with_spaces_quotes_or_unicode_serves() -> None:
    fine = LocalEngine(world_traversable_tmp("lr-plain-") / "my checkout's ünïcødé \\ dir" / ".refresher")
    try:
        with psycopg.connect(fine.start("lr_plain").dsn(), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        fine.stop("lr_plain")


def _cli(state: Path, *args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``refresher`` command on the state dir ``state``."""
    env = {**os.environ, "REFRESHER_STATE_DIR": str(state)}
    if store is not None:
        env["FEATURE_STORE_PATH"] = str(store)
    command = [sys.executable, "-m", "refresher.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("named", ["the-profile", "all"])
def test_down_again_after_a_down_killed_while_removing_finishes_the_removal(named: str) -> None:
    # The killed down left the cluster's files under a hidden name, which `status` does not list: the user's
    # retry (`refresher down`, to free the disk) said "nothing to stop" and the files stayed.
    state = world_traversable_tmp("lr-down-")
    engine = LocalEngine(state)
    engine.start("lr_redown")
    killed = subprocess.run([sys.executable, "-c", KILLED_REMOVING, str(state), "lr_redown"])
    assert killed.returncode == -signal.SIGKILL
    assert [p for p in engine.base.iterdir() if REMOVING_INFIX in p.name] != []
    profile = "lr_redown" if named == "the-profile" else "all"
    down = _cli(state, "down", "--profile", profile)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "stopped local:lr_redown"
    assert [p.name for p in engine.base.iterdir()] == []  # its lock file too, as after any down


def test_refresh_with_a_read_only_state_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    state = world_traversable_tmp("lr-ro-") / "state"
    state.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "--bind", "-o", "ro", str(state), str(state)]).returncode
    ):
        pytest.skip("a read-only bind mount needs root")
    try:
        done = _cli(
            state, "refresh", "--profile", "ui_testing", "--engine", "local", store=tmp_path / "store"
        )
    finally:
        subprocess.run(["umount", str(state)], check=False)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # a traceback from the profile's lock file before
    assert line.startswith(f"refresher: {state}/") and "Read-only file system" in line


def test_down_kills_a_server_pg_ctl_could_not_stop_instead_of_leaving_it_running_without_its_files(
    engine: LocalEngine,
) -> None:
    # pg_ctl stop fails (its 60 s wait ran out on a hung shutdown; a server it may not signal): down removed the
    # files under the running server, which served on until its once-a-minute check of postmaster.pid.
    info = engine.start("lr_unstoppable")
    running = Postmaster.read(engine.base / "lr_unstoppable" / "pgdata")
    assert running is not None
    failing = world_traversable_tmp("lr-failing-")
    (failing / "pg_ctl").write_text("#!/bin/sh\necho 'pg_ctl: server does not shut down' >&2\nexit 1\n")
    (failing / "pg_ctl").chmod(0o755)
    (failing / "postgres").symlink_to(engine.bin_dir / "postgres")
    state_file = engine.base / "lr_unstoppable" / "server.json"
    state_file.write_text(state_file.read_text().replace(str(engine.bin_dir), str(failing)))
    assert engine.stop("lr_unstoppable")
    assert not _serving(running.pid)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info.dsn(), connect_timeout=2).close()
