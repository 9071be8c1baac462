"""The local engine against real embedded PostgreSQL servers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from refresher.engines import _pgctl, local
from refresher.engines.base import Engine, ServerInfo
from refresher.engines.local import REMOVING_INFIX, LocalEngine, Postmaster
from refresher.errors import EngineUnavailable, ProfileError
from refresher.snapshot import restore_pristine, save_pristine
from tests.child_processes import outputs, reap
from tests.fixtures_postgres import world_traversable_tmp

pytestmark = pytest.mark.postgres


def _kill_server_keep_data(engine: LocalEngine, profile: str, mode: str = "fast") -> None:
    """What a reboot does: the server is gone, its data stays (``immediate``: as a crash leaves it, to recover)."""
    pgdata = engine.base / profile / "pgdata"
    result = _pgctl.run(engine.bin_dir, "pg_ctl", ["stop", "-D", str(pgdata), "-m", mode, "-w"],
                        _pgctl.OsUser.for_server(), cwd=pgdata.parent)  # fmt: skip
    assert result.returncode == 0, result.output


def test_implements_the_engine_protocol(engine: LocalEngine) -> None:
    assert isinstance(engine, Engine)


def test_start_serves_a_database_named_after_the_profile(engine: LocalEngine) -> None:
    info = engine.start("lc_basic")
    with psycopg.connect(info.dsn()) as conn:
        row = conn.execute("SELECT current_database(), current_user, current_setting('fsync')").fetchone()
    assert row == ("lc_basic", info.user, "off")
    assert info.host == "127.0.0.1" and info.dbname == "lc_basic"
    state = json.loads((engine.base / "lc_basic" / "server.json").read_text())
    assert state["port"] == info.port and state["password"] == info.password
    assert (engine.base / "lc_basic" / "server.json").stat().st_mode & 0o777 == 0o600


def test_is_new_until_a_cluster_exists_and_again_once_it_is_gone_or_its_password_lost(
    engine: LocalEngine,
) -> None:
    assert engine.is_new("lc_new")
    engine.start("lc_new")
    assert not engine.is_new("lc_new")
    _kill_server_keep_data(engine, "lc_new")
    assert not engine.is_new("lc_new")  # stopped, data kept: a start restarts it
    (engine.base / "lc_new" / "server.json").unlink()
    assert engine.is_new("lc_new")  # a start discards a cluster nobody can log into
    engine.stop("lc_new")
    assert engine.is_new("lc_new")


def test_start_is_idempotent_and_reuses_the_running_server(engine: LocalEngine) -> None:
    first = engine.start("lc_idem")
    pid = Postmaster.read(engine.base / "lc_idem" / "pgdata")
    again = engine.start("lc_idem")
    assert again == first
    assert Postmaster.read(engine.base / "lc_idem" / "pgdata") == pid


def test_a_start_of_the_running_server_leaves_its_state_file_as_it_is(engine: LocalEngine) -> None:
    # Every refresh starts the running server; each rewrote server.json, and its fsync waited behind the kernel's
    # writeback of whatever was written last (a pool refill's clones): 0.4-2 s of the daily refresh's engine phase.
    engine.start("lc_keep_state")
    path = engine.base / "lc_keep_state" / "server.json"
    before = path.stat()
    engine.start("lc_keep_state")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # os.replace: a new inode
    _kill_server_keep_data(engine, "lc_keep_state")
    engine.start("lc_keep_state")  # a new postmaster: its pid is recorded
    state = local.ServerState.read(path)
    running = Postmaster.read(engine.base / "lc_keep_state" / "pgdata")
    assert state is not None and running is not None and state.pid == running.pid


def test_status_and_info_survive_a_cli_restart(engine: LocalEngine) -> None:
    info = engine.start("lc_restart")
    fresh = LocalEngine(engine.base.parent)  # a new CLI process would build exactly this
    assert fresh.info("lc_restart") == info
    [status] = fresh.status("lc_restart")
    assert status.running and status.port == info.port
    assert "lc_restart" in {s.profile for s in fresh.status()}


def test_the_server_outlives_the_process_that_started_it(engine: LocalEngine) -> None:
    code = (
        "import sys; from pathlib import Path; from refresher.engines.local import LocalEngine;"
        "print(LocalEngine(Path(sys.argv[1])).start('lc_child').port)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(engine.base.parent)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    info = engine.info("lc_child")
    assert info is not None and info.port == int(done.stdout)
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stop_removes_the_server_and_its_data(engine: LocalEngine) -> None:
    info = engine.start("lc_stop")
    assert engine.stop("lc_stop") is True
    assert not (engine.base / "lc_stop").exists()
    assert engine.info("lc_stop") is None and engine.status("lc_stop") == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(info.dsn(), connect_timeout=2).close()
    assert engine.stop("lc_stop") is False


# A `down` killed (or interrupted) while removing the cluster: everything of pgdata gone but PG_VERSION, and the
# profile's server.json, as a removal in directory order can leave them.
KILLED_REMOVING = (
    "import os, shutil, signal, sys; from pathlib import Path; from refresher.engines import local\n"
    "def interrupted(path, *args, **kwargs):\n"
    "    for leftover in Path(path).rglob('*'):\n"
    "        if leftover.is_file() and leftover.name not in ('PG_VERSION', 'server.json'):\n"
    "            leftover.unlink()\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "shutil.rmtree = interrupted\n"
    "local.LocalEngine(Path(sys.argv[1])).stop(sys.argv[2])\n"
)


def test_kill_9_while_down_removes_the_cluster_then_the_next_start_makes_a_new_one(
    engine: LocalEngine,
) -> None:
    # It found a half-removed cluster under the profile's name and tried to run it: the postmaster exited
    # (no postgresql.conf) and the start waited out its timeout, at every refresh, until another `down`.
    engine.start("lc_kill_down")
    done = subprocess.run([sys.executable, "-c", KILLED_REMOVING, str(engine.base.parent), "lc_kill_down"])
    assert done.returncode == -signal.SIGKILL
    assert engine.status("lc_kill_down") == []  # gone at once, as far as anyone can see
    info = engine.start("lc_kill_down")
    with psycopg.connect(info.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lc_kill_down",)
    assert [
        p.name for p in engine.base.iterdir() if "lc_kill_down" in p.name and p.name != ".lc_kill_down.lock"
    ] == ["lc_kill_down"]  # the leftover removed too


def test_a_killed_downs_leftover_goes_at_any_profiles_down_unless_its_profile_is_busy_never_at_a_start(
    engine: LocalEngine,
) -> None:
    # Its profile is never used again: its hidden leftover (a cluster's gigabytes) stayed for good.
    def leftovers() -> list[str]:
        return sorted(
            p.name.partition(REMOVING_INFIX)[0] for p in engine.base.iterdir() if REMOVING_INFIX in p.name
        )

    # What the kill above leaves (see the test before), for two profiles: a killed down's next step would be
    # a rmtree of the other's leftover.
    for profile in ("lc_gone_a", "lc_gone_b"):
        leftover = engine.base / f".{profile}{REMOVING_INFIX}0123abcd" / "pgdata"
        leftover.mkdir(parents=True)
        (leftover / "PG_VERSION").write_text("18\n")
    assert leftovers() == [".lc_gone_a", ".lc_gone_b"]
    # Another process holds lc_gone_b's lock (its own start or down): its leftover is left, never waited for.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(engine.base / ".lc_gone_b.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert engine.stop("lc_other") is False  # a down of a profile that has no cluster
        assert leftovers() == [".lc_gone_b"]
    finally:
        holder.kill()
        holder.communicate()
    # A start of another profile leaves it: it removed it under lc_gone_b's lock, so that start, and one of
    # lc_gone_b, waited for the whole removal (20,000 small files: 2-34 s on the loaded dev machine).
    engine.start("lc_other")
    assert leftovers() == [".lc_gone_b"]
    assert engine.stop("lc_other") is True
    assert leftovers() == []


HOLD_LOCK = (
    "import sys, time, filelock\n"
    "lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)\n"
)


def test_a_stopped_server_restarts_with_its_data_and_moves_off_a_taken_port(engine: LocalEngine) -> None:
    info = engine.start("lc_reboot")
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, "lc_reboot")
    [status] = engine.status("lc_reboot")
    assert not status.running and "data kept" in status.detail
    assert engine.info("lc_reboot") is None
    # Something else grabbed the remembered port meanwhile: the engine must retry on another one.
    with socket.socket() as squatter:
        # The killed server's connections may leave the port in TIME_WAIT; a listener still blocks Postgres.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", info.port))
        squatter.listen()
        again = engine.start("lc_reboot")
    assert again.port != info.port and again.password == info.password
    with psycopg.connect(again.dsn()) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)


@pytest.mark.parametrize("auth", ["scram-sha-256", "trust"])
def test_a_postgres_on_the_remembered_port_is_never_taken_for_ours(engine: LocalEngine, auth: str) -> None:
    # Another Postgres took the port while ours was down (another checkout's server, a container published on a
    # random port). Our login poll reached it before our postmaster failed to bind: with a password it was an
    # error ("password authentication failed") instead of a move to another port; with trust it was taken for
    # ours, and the profile's database made (and loaded, snapshotted) on the other server.
    profile = f"lc_moved_{auth[:5]}"
    info = engine.start(profile)
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, profile)
    other = LocalEngine(world_traversable_tmp("lc-squatter-"), port=info.port)
    try:
        squatter = other.start("lc_squatter")
        if auth == "trust":
            hba = other.base / "lc_squatter" / "pgdata" / "pg_hba.conf"
            hba.write_text(f"host all all 127.0.0.1/32 trust\n{hba.read_text()}")
            with psycopg.connect(squatter.dsn("postgres"), autocommit=True) as conn:
                conn.execute("SELECT pg_reload_conf()")
        again = engine.start(profile)
        assert again.port != info.port and again.password == info.password
        with psycopg.connect(again.dsn()) as conn:
            assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
        with psycopg.connect(squatter.dsn("postgres")) as conn:
            names = {name for (name,) in conn.execute("SELECT datname FROM pg_database")}
        assert profile not in names
    finally:
        other.stop("lc_squatter")
        shutil.rmtree(other.base.parent, ignore_errors=True)


def test_a_server_that_fails_to_start_is_an_error_with_its_log_at_once(local_state_dir: Path) -> None:
    patient = LocalEngine(local_state_dir, ready_timeout=600)
    try:
        patient.start("lc_badconf")
        _kill_server_keep_data(patient, "lc_badconf")
        with (patient.base / "lc_badconf" / "pgdata" / "refresher.conf").open("a") as conf:
            conf.write("shared_buffers = 'lots'\n")
        started = time.monotonic()
        with pytest.raises(
            EngineUnavailable, match=r'(?s)not ready.*invalid value for parameter "shared_buffers"'
        ):
            patient.start("lc_badconf")
        # pg_ctl start -W does not wait: the postmaster's FATAL line ends our wait, not the 600 s timeout
        assert time.monotonic() - started < 300
    finally:
        patient.stop("lc_badconf")


@pytest.mark.parametrize(
    ("lost", "says"),
    [
        ("postgresql.conf", "could not access the server configuration file"),
        ("global/pg_control", "could not find the database system"),
    ],
)
def test_a_server_that_exits_before_its_logging_starts_ends_the_wait_at_once(
    local_state_dir: Path, lost: str, says: str
) -> None:
    # Such a postmaster writes its reason to stderr, with no FATAL: the wait lasted the whole readiness timeout
    # and blamed the port ("it never opened the port").
    profile = f"lc_lost_{lost.split('/')[0].split('.')[0]}"
    slow = LocalEngine(local_state_dir, ready_timeout=20)
    try:
        LocalEngine(local_state_dir).start(profile)  # its first start, initdb's, waits the usual 60 s
        _kill_server_keep_data(slow, profile)
        (slow.base / profile / "pgdata" / lost).unlink()
        with pytest.raises(EngineUnavailable, match=rf"(?s)not ready after 20s \(it exited\).*{says}"):
            slow.start(profile)
    finally:
        slow.stop(profile)


@pytest.mark.parametrize("left", ["a dead pid", "nothing", "pid 0", "pid -1"])
def test_a_stale_postmaster_pid_is_not_mistaken_for_a_server(engine: LocalEngine, left: str) -> None:
    profile = f"lc_stale_{left.split()[-1].replace('-', 'minus')}"
    engine.start(profile)
    pgdata = engine.base / profile / "pgdata"
    _kill_server_keep_data(engine, profile)
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that surely is not running any more
    # A damaged file may say 0 or -1, which kill(pid, 0) takes for our process group or every process.
    pid = int(left.split()[-1]) if left.startswith("pid") else child.pid
    if left == "nothing":  # a crash between creating the file and writing it
        (pgdata / "postmaster.pid").write_text("")
    else:
        (pgdata / "postmaster.pid").write_text(f"{pid}\n{pgdata}\n0\n5432\n\n127.0.0.1\n0 0\nready\n")
        [status] = engine.status(profile)
        assert not status.running and "stale" in status.detail
    info = engine.start(profile)
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_stale_postmaster_pid_naming_another_clusters_postmaster_is_not_taken_for_ours(
    engine: LocalEngine,
) -> None:
    # After a reboot the pid in the file may belong to anything, even another cluster's postmaster: a postgres
    # process, alive, but not ours (it works in another data directory).
    info = engine.start("lc_reused")
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, "lc_reused")
    engine.start("lc_reuser")
    theirs = Postmaster.read(engine.base / "lc_reuser" / "pgdata")
    assert theirs is not None
    pgdata = engine.base / "lc_reused" / "pgdata"
    (pgdata / "postmaster.pid").write_text(
        f"{theirs.pid}\n{pgdata}\n0\n{info.port}\n\n127.0.0.1\n0 0\nready\n"
    )
    [status] = engine.status("lc_reused")
    assert not status.running and f"dead pid {theirs.pid}" in status.detail
    again = engine.start("lc_reused")
    ours = Postmaster.read(pgdata)
    assert ours is not None and ours.pid != theirs.pid and ours.alive()
    with psycopg.connect(again.dsn()) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
    assert engine.info("lc_reuser") is not None  # theirs untouched


def _unused_ids(count: int) -> list[int]:
    """Uids (and gids of the same number) no account or group has: users made up for one test, nothing to clean."""
    import grp
    import pwd

    def unused(number: int) -> bool:
        try:
            pwd.getpwuid(number)
        except KeyError:
            try:
                grp.getgrgid(number)
            except KeyError:
                return True
        return False

    return [number for number in range(61_000, 65_000) if unused(number)][:count]


def _as_user(uid: int, check: Any) -> bool:
    """``check()`` in a forked child that has become ``uid`` (no capabilities, no groups): a CLI not run as root."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            code = 0 if check() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1), f"the check failed: status {status}"
    return os.WEXITSTATUS(status) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run processes as two other users")
def test_a_stale_pid_file_naming_another_users_postgres_is_ours_only_if_that_user_owns_the_data() -> None:
    # A CLI not run as root may not read another user's /proc/<pid>/cwd; such a postgres process counted as our
    # server, so a stale postmaster.pid naming one (its pid reused after a reboot) showed the profile running.
    them, us = _unused_ids(2)
    work = Path(tempfile.mkdtemp(prefix="refresher-foreign-"))
    try:
        work.chmod(0o755)
        program = work / "postgres"  # a postgres process by its name, as alive() tells one
        shutil.copy("/bin/sleep", program)
        program.chmod(0o755)
        for name, owner in (("elsewhere", them), ("ours", us), ("theirs", them)):
            (work / name).mkdir()
            os.chown(work / name, owner, owner)
        foreign = subprocess.Popen(
            [str(program), "60"], cwd=work / "elsewhere", user=them, group=them, extra_groups=[]
        )
        try:

            def unreadable() -> bool:
                try:
                    os.stat(f"/proc/{foreign.pid}/cwd")
                except PermissionError:
                    return True
                return False

            assert _as_user(us, unreadable)  # the case under test, for real
            assert not _as_user(us, Postmaster(foreign.pid, 5432, "ready", work / "ours").alive)
            # Run by the owner of the data directory, it may be ours: we cannot tell, and the pid file says so.
            assert _as_user(us, Postmaster(foreign.pid, 5432, "ready", work / "theirs").alive)
        finally:
            foreign.kill()
            foreign.wait()
    finally:
        shutil.rmtree(work)


def test_kill_9_of_the_postmaster_leaves_its_pid_file_and_the_next_start_serves_the_data(
    engine: LocalEngine,
) -> None:
    info = engine.start("lc_crashed")
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("SET synchronous_commit = on")  # its WAL written at commit: the crash cannot lose it
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    pgdata = engine.base / "lc_crashed" / "pgdata"
    crashed = Postmaster.read(pgdata)
    assert crashed is not None
    os.kill(crashed.pid, signal.SIGKILL)
    while _state(crashed.pid) not in ("Z", "gone"):  # a zombie until its children have gone (1-2 s)
        time.sleep(0.001)
    again = engine.start("lc_crashed")
    running = Postmaster.read(pgdata)
    assert running is not None and running.pid != crashed.pid
    with psycopg.connect(again.dsn()) as conn:
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "gone"


# A postmaster's first moment, frozen: it has created postmaster.pid (empty, O_EXCL, as postgres does) and not yet
# written it; after argv[3] seconds it gives up and removes the file, saying whether it was still its own.
FIRST_MOMENT = """
import os, sys, time
pid_file = os.path.join(sys.argv[2], "postmaster.pid")
fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
print("created", flush=True)
time.sleep(float(sys.argv[3]))
try:
    kept = os.stat(pid_file).st_ino == os.fstat(fd).st_ino
except FileNotFoundError:
    kept = False
if kept:
    os.unlink(pid_file)
print("kept" if kept else "removed under it", flush=True)
"""


def _starting_postmaster(pgdata: Path, seconds: float, bin_dir: Path) -> subprocess.Popen[str]:
    """A process named postgres, ``-D pgdata`` in its command line, caught between creating and writing its file."""
    postgres = bin_dir / "postgres"
    postgres.symlink_to(Path(sys.executable).resolve())  # the kernel names a process after the file it runs
    args = [str(postgres), "-c", FIRST_MOMENT, "-D", str(pgdata), str(seconds)]
    child = subprocess.Popen(args, cwd=pgdata, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "created\n"
    except BaseException:
        reap(child)
        raise
    return child


@pytest.mark.parametrize("action", ["start", "stop"])
def test_a_postmaster_pid_still_being_written_is_waited_for_never_removed(
    engine: LocalEngine, tmp_path: Path, action: str
) -> None:
    # A start (or `refresher down`) that took the empty file for stale removed it, and a second postmaster could
    # start on the same data beside the first (a CLI killed just after `pg_ctl start`, then the next command).
    profile = f"lc_writing_{action}"
    info = engine.start(profile)
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    _kill_server_keep_data(engine, profile)
    pgdata = engine.base / profile / "pgdata"
    child = _starting_postmaster(pgdata, 1.5, tmp_path)
    try:
        if action == "stop":
            assert engine.stop(profile)
        else:
            again = engine.start(profile)
            with psycopg.connect(again.dsn()) as conn:
                assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)
    finally:
        [(out, _)] = outputs([child], timeout=60)
    assert out == "kept\n"


def test_a_postmaster_pid_that_stays_empty_while_postgres_works_there_is_an_error_not_removed(
    local_state_dir: Path, tmp_path: Path
) -> None:
    # Impatient only where it waits on the stuck file: its first start and its stop waited 0.5 s for a server
    # that a loaded machine may take longer to start or stop.
    patient = LocalEngine(local_state_dir)
    impatient = LocalEngine(local_state_dir, ready_timeout=0.5)
    try:
        patient.start("lc_stuck")
        _kill_server_keep_data(patient, "lc_stuck")
        pgdata = patient.base / "lc_stuck" / "pgdata"
        child = _starting_postmaster(pgdata, 60, tmp_path)
        try:
            with pytest.raises(EngineUnavailable, match=f"PostgreSQL processes still work in .*{child.pid}"):
                impatient.start("lc_stuck")
            assert (pgdata / "postmaster.pid").exists()
        finally:
            reap(child)
    finally:
        (patient.base / "lc_stuck" / "pgdata" / "postmaster.pid").unlink(missing_ok=True)
        patient.stop("lc_stuck")


def test_a_pinned_port_that_is_taken_is_a_one_line_error(local_state_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        pinned = LocalEngine(local_state_dir, port=port)
        try:
            with pytest.raises(EngineUnavailable, match=f"port {port} .* already in use") as caught:
                pinned.start("lc_pinned")
            assert "\n" not in str(caught.value)
        finally:
            pinned.stop("lc_pinned")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
def test_as_root_the_server_runs_as_the_unprivileged_user(engine: LocalEngine) -> None:
    engine.start("lc_root")
    postmaster = Postmaster.read(engine.base / "lc_root" / "pgdata")
    assert postmaster is not None
    assert Path(f"/proc/{postmaster.pid}").stat().st_uid == _pgctl.OsUser.for_server().uid != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another OS user")
def test_an_untraversable_state_dir_names_the_directory_to_fix(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    locked = Path("/tmp") / f"refresher-locked-{os.getpid()}"
    locked.mkdir(mode=0o700)
    try:
        with pytest.raises(EngineUnavailable, match=f"{locked}: .*chmod o\\+x {locked}"):
            LocalEngine(locked / "state").start("lc_locked")
    finally:
        subprocess.run(["rm", "-rf", str(locked)], check=True)


# -- the cluster's layout: 1 MB WAL segments, and the 16 MB of a cluster made before kept ---------------------------


def _query(info: ServerInfo, text: str) -> Any:
    with psycopg.connect(info.dsn()) as conn:
        row = conn.execute(text.encode()).fetchone()
    return row[0] if row else None


def test_a_new_cluster_has_1mb_wal_segments(engine: LocalEngine) -> None:
    info = engine.start("lc_wal")
    assert _query(info, "SHOW wal_segment_size") == "1MB"


def test_a_new_cluster_has_no_page_checksums(engine: LocalEngine) -> None:
    info = engine.start("lc_nocsum")
    assert _query(info, "SHOW data_checksums") == "off"  # PG 18's initdb turns them on unless told not to


@pytest.mark.parametrize(
    ("initdb_args", "setting", "value"),
    [
        pytest.param((), "wal_segment_size", "16MB", id="16mb-wal-segments"),
        # initdb takes the last of --no-data-checksums and --data-checksums
        pytest.param((*local.INITDB_ARGS, "--data-checksums"), "data_checksums", "on", id="page-checksums"),
    ],
)
def test_a_cluster_made_by_an_older_initdb_keeps_its_layout_and_data_without_a_new_initdb(
    engine: LocalEngine,
    monkeypatch: pytest.MonkeyPatch,
    initdb_args: tuple[str, ...],
    setting: str,
    value: str,
) -> None:
    with monkeypatch.context() as before:
        before.setattr(local, "INITDB_ARGS", initdb_args)  # initdb as the versions before ran it
        info = engine.start("lc_older")
    assert _query(info, f"SHOW {setting}") == value
    with psycopg.connect(info.dsn()) as conn:
        conn.execute("CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 50000) g")
    _kill_server_keep_data(engine, "lc_older")
    again = engine.start("lc_older")
    assert again.password == info.password
    assert _query(again, f"SHOW {setting}") == value
    with psycopg.connect(again.dsn()) as conn:
        conn.execute("UPDATE kept SET id = -id")  # its pages written again, checksummed where it has them
    assert _query(again, "SELECT sum(id) FROM kept") == -(50000 * 50001 // 2)


PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(not (PG15 / "initdb").is_file(), reason="no PostgreSQL 15 binaries (Debian's) here")
def test_an_initdb_without_the_no_checksums_flag_still_makes_the_cluster(local_state_dir: Path) -> None:
    pg15 = LocalEngine(local_state_dir, bin_dir=PG15)
    user = _pgctl.OsUser.for_server()
    assert not _pgctl.initdb_accepts(PG15, local.NO_CHECKSUMS, user, local_state_dir)
    assert _pgctl.initdb_accepts(PG15, "--data-checksums", user, local_state_dir)
    try:
        info = pg15.start("lc_pg15")
        assert str(_query(info, "SHOW server_version")).startswith("15.")
        assert _query(info, "SHOW data_checksums") == "off"  # PG 15's default
    finally:
        pg15.stop("lc_pg15")


def test_crash_recovery_and_resets_are_exact_across_many_small_wal_segments(engine: LocalEngine) -> None:
    info = engine.start("lc_walcrash")
    digest = "SELECT md5(string_agg(id || ':' || price, ',' ORDER BY id)) FROM bars"
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE bars AS SELECT g AS id, g * 1.5 AS price FROM generate_series(1, 60000) g")
        conn.execute("ALTER TABLE bars ADD PRIMARY KEY (id)")
    pristine = _query(info, digest)
    save_pristine(info, pool_size=1)
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        conn.execute("UPDATE bars SET price = price + 1")
        conn.execute("DELETE FROM bars WHERE id % 3 = 0")
        conn.execute("SET synchronous_commit = on")  # this commit's WAL, and all before it, reaches the files
        conn.execute("UPDATE bars SET price = -price WHERE id % 7 = 0")
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", start).fetchone()
        assert row is not None and row[0] > 5 * 2**20, "fewer segments than this test is about"
    changed = _query(info, digest)
    _kill_server_keep_data(engine, "lc_walcrash", "immediate")  # no checkpoint: the start replays the WAL
    info = engine.start("lc_walcrash")
    assert _query(info, digest) == changed
    assert restore_pristine(info, refill=False).method == "pool"
    assert _query(info, digest) == pristine
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE bars SET price = 0")
    assert restore_pristine(info, refill=False).method == "template"
    assert _query(info, digest) == pristine


def test_snapshots_and_resets_add_nothing_to_the_server_log(engine: LocalEngine) -> None:
    info = engine.start("lc_quietlog")
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE bars AS SELECT g AS id FROM generate_series(1, 1000) g")
    log = engine.base / "lc_quietlog" / "server.log"
    before = log.stat().st_size
    # Three copies, two checkpoints each: the snapshot and its clone, then the second reset's (the pool is empty).
    save_pristine(info, pool_size=1)
    restore_pristine(info, refill=False)
    restore_pristine(info, refill=False)
    assert log.read_bytes()[before:].decode() == ""


@pytest.mark.parametrize("bad", ["Bad", "1abc", "a-b", "a" * 42, "../x", ""])
def test_profile_names_are_validated(engine: LocalEngine, bad: str) -> None:
    with pytest.raises(ProfileError, match="profile"):
        engine.start(bad)


# -- a start that survives a crash, and a full disk -------------------------------------------------------------


def test_kill_9_during_initdb_then_the_next_start_cleans_up_and_serves(engine: LocalEngine) -> None:
    code = "import sys; from pathlib import Path; from refresher.engines.local import LocalEngine;" + (
        "LocalEngine(Path(sys.argv[1])).start('lc_killed')"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(engine.base.parent)])
    root = engine.base / "lc_killed"
    deadline = time.monotonic() + 120
    while not any(p.is_dir() and any(p.iterdir()) for p in root.glob("pgdata.init-*")):
        assert child.poll() is None, "the start finished before initdb could be interrupted"
        assert time.monotonic() < deadline, "initdb never began"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()

    [status] = engine.status("lc_killed")
    assert not status.running and "start interrupted" in status.detail
    assert engine.info("lc_killed") is None
    secrets_left = [p for p in root.rglob("*") if "pw" in p.name.lower()]
    assert secrets_left == []

    info = engine.start("lc_killed")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lc_killed",)
    assert list(root.glob("pgdata.init-*")) == []
    assert engine.status("lc_killed")[0].running


KILLED_AT = (
    "import os, signal, sys; from pathlib import Path; from refresher.engines import local;"
    "step = getattr(local, sys.argv[2]);"
    "setattr(local, sys.argv[2], lambda *a, **k: (step(*a, **k), os.kill(os.getpid(), signal.SIGKILL)));"
    "local.LocalEngine(Path(sys.argv[1])).start(sys.argv[3])"
)


@pytest.mark.parametrize(
    ("step", "profile"),
    [
        pytest.param("_launched", "lc_kill_login", id="after-pg_ctl-start-before-the-first-login"),
        pytest.param("_ensure_database", "lc_kill_created", id="after-create-database-before-server-json"),
    ],
)
def test_kill_9_after_the_postmaster_started_then_the_next_start_serves_it(
    engine: LocalEngine, step: str, profile: str
) -> None:
    # The CLI dies with the postmaster forked (and maybe still starting): the next start must find that server,
    # not start a second one on the same data, and serve the profile's database.
    child = subprocess.run([sys.executable, "-c", KILLED_AT, str(engine.base.parent), step, profile])
    assert child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while (
        orphan := Postmaster.read(engine.base / profile / "pgdata")
    ) is None:  # written just after the fork
        assert time.monotonic() < deadline, "the orphaned postmaster never wrote postmaster.pid"
        time.sleep(0.005)
    assert orphan.alive()

    info = engine.start(profile)
    assert info.port == orphan.port
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (profile,)
    running = Postmaster.read(engine.base / profile / "pgdata")
    assert running is not None and running.pid == orphan.pid
    assert engine.info(profile) == info


# A start killed between writing server.json's temporary file and renaming it into place, at its WRITE-th write.
KILLED_WRITING_STATE = """
import os, signal, sys
from pathlib import Path
from refresher.engines.local import LocalEngine
replace, writes = os.replace, 0
def killed(src, dst, *args, **kwargs):
    global writes
    writes += os.fspath(dst).endswith("server.json")
    if writes == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = killed
LocalEngine(Path(sys.argv[1])).start(sys.argv[2])
"""


@pytest.mark.parametrize("write", [1, 2], ids=["before-initdb-is-renamed-in", "after-the-server-started"])
def test_kill_9_between_writing_server_json_and_its_rename_leaves_no_copy_of_the_password(
    engine: LocalEngine, write: int
) -> None:
    # The temporary file holds the cluster's password: it stayed beside server.json as long as the profile did.
    profile = f"lc_killjson{write}"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITING_STATE, str(engine.base.parent), profile, str(write)],
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL
    root = engine.base / profile
    assert len(list(root.glob(".server.json.*.tmp"))) == 1  # what the kill left
    info = engine.start(profile)
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (profile,)
    assert list(root.glob(".server.json.*.tmp")) == []


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 16 MB tmpfs: too small for initdb (about 31 MB). Needs root, as the server's OS user switch does."""
    path = Path(tempfile.mkdtemp(prefix="refresher-full-", dir="/tmp"))
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        path.rmdir()
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def test_a_full_disk_during_initdb_is_one_line_naming_the_path_and_space(tiny_disk: Path) -> None:
    engine = LocalEngine(tiny_disk)
    with pytest.raises(EngineUnavailable) as caught:
        engine.start("full")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"disk full: {tiny_disk / 'local' / 'full'} has ")
    assert "needs at least 64 MB" in message
    assert caught.value.exit_code == 2
    # Nothing half-made that a later start would trust.
    assert not (tiny_disk / "local" / "full").exists()
    assert engine.status() == []


def test_refresh_on_a_full_disk_is_one_line_and_exit_2(tiny_disk: Path, tmp_path: Path) -> None:
    env = {**os.environ, "FEATURE_STORE_PATH": str(tmp_path / "store")}
    args = ["refresh", "--profile", "ui_testing", "--engine", "local", "--state-dir", str(tiny_disk)]
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"disk full: {tiny_disk / 'local' / 'ui_testing'} has " in line
    assert "needs at least 64 MB" in line


def _minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def test_a_connections_second_key_build_reuses_the_memory_of_its_first(engine: LocalEngine) -> None:
    # A loader fills a month after a month on one connection, each with a sorted key build (refresher.partitions):
    # the server keeps the sort's freed memory (SERVER_ENV) rather than faulting it in again at every month.
    server = engine.start("prof")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        faults = []
        for _ in range(2):
            with conn.transaction(force_rollback=True):
                conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")
                conn.execute(
                    "CREATE TABLE m AS SELECT 'SYM' || (i / 8000) AS symbol, "
                    "timestamptz '2024-03-01' + i * interval '1 minute' AS ts FROM generate_series(1, 780000) i"
                )
                before = _minor_faults(pid)
                conn.execute("ALTER TABLE m ADD PRIMARY KEY (symbol, ts)")
                faults.append(_minor_faults(pid) - before)
    assert faults[0] > 3000  # the first build faults its sort memory in (the check means something)
    assert faults[1] < faults[0] / 10, faults


def test_a_state_file_with_a_field_a_newer_refresher_adds_is_read(tmp_path: Path) -> None:
    """A field this refresher does not know was a TypeError, 'unreadable server state': every start failed, and
    its advice, `refresher down`, removed the cluster."""
    from refresher.errors import EngineStateError

    state = local.ServerState(5432, "refresher", "secret", "/usr/lib/postgresql/15/bin", "15", 42)
    path = tmp_path / "server.json"
    state.write(path)
    recorded = json.loads(path.read_text())
    # A known key garbled beside a newer one is left out as unknown: its field missing, the state still refused.
    garbled = json.dumps(
        {**{k: v for k, v in recorded.items() if k != "bin_dir"}, "bin_dir_": recorded["bin_dir"], "newer": 1}
    )
    path.write_text(json.dumps({**recorded, "newer": [1]}))
    assert local.ServerState.read(path) == state  # fails before: EngineStateError
    for broken in ("[1]", '{"port": 1}', "{", garbled):
        path.write_text(broken)
        with pytest.raises(EngineStateError, match="unreadable server state"):
            local.ServerState.read(path)


def test_a_state_file_key_misspelled_by_hand_is_refused_naming_it(tmp_path: Path) -> None:
    """A known key misspelled by hand was left out as a newer refresher's: ``pid`` read as its default, None, and
    ``bin_dir`` missing said 'run `refresher down`', which removes the cluster for a typo. Now one line names the
    file, the key, its value and the field meant; an older file (no ``pid``) and a newer one still read."""
    from refresher.errors import EngineStateError

    state = local.ServerState(5432, "refresher", "secret", "/usr/lib/postgresql/15/bin", "15", 42)
    path = tmp_path / "server.json"
    state.write(path)
    recorded = json.loads(path.read_text())
    for good, bad in (("pid", "pdi"), ("bin_dir", "bindir"), ("port", "Port")):
        path.write_text(json.dumps({**{k: v for k, v in recorded.items() if k != good}, bad: recorded[good]}))
        with pytest.raises(EngineStateError) as caught:
            local.ServerState.read(path)  # fails before for pdi: read with pid=None
        message = str(caught.value)
        assert message.startswith(f"{path}: unreadable server state: key {bad!r} (value {recorded[good]!r})")
        assert f"did you mean {good!r}" in message and "refresher down" not in message, message
    path.write_text(
        json.dumps({**{k: v for k, v in recorded.items() if k != "password"}, "pasword": "secret"})
    )
    with pytest.raises(EngineStateError, match=r"key 'pasword' \(value not shown\)") as caught:
        local.ServerState.read(path)
    assert "secret" not in str(caught.value)
    # An older refresher's file (no pid yet) and a newer one's (every known key and one more) are read.
    path.write_text(json.dumps({k: v for k, v in recorded.items() if k != "pid"}))
    assert local.ServerState.read(path) == dataclasses.replace(state, pid=None)
    path.write_text(json.dumps({**recorded, "pid_file": "x", "ports": [1]}))
    assert local.ServerState.read(path) == state
