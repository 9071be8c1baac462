"""A command holding a lock may be stopped (Ctrl-Z: SIGSTOP), slow or killed: every other command then waits
saying what for (``--no-wait``: one line, exit 2, at once), or answers without that lock; none hangs silently.

Each holder is stopped in the lock for real, and every command runs with a short subprocess timeout: on the old
code each test failed by that timeout, never by hanging the suite."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from refresher.engines.local import Postmaster
from tests.child_processes import outputs, reap
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_refresh_e2e import Workspace, _stop_when, made_in_start

TIMEOUT = 60
STARTING = "another command is starting or stopping its local server"
# The CLI with any grace of the engine's lock ten minutes long: a command given it waits past its TIMEOUT.
_LONG_GRACE = (
    "import sys; from refresher import cli; from refresher.engines import _common; "
    "_common.HOLD_GRACE_SECONDS = 600; sys.exit(cli.main())"
)


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    space = Workspace(world_traversable_tmp("refresher-stopped-"), "local", f"stp_{uuid.uuid4().hex[:8]}")
    space.write_profile(symbols=["AAPL"], months=1)
    try:
        yield space
    finally:
        space.down()


@contextlib.contextmanager
def _stopped(code: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A Python process running ``code``, which takes its lock, prints a line and stops itself (SIGSTOP) in it;
    continued (SIGCONT) and waited for after the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline(), "the holder never took its lock"
        _stop_when(proc, lambda: Path(f"/proc/{proc.pid}/stat").read_text().split()[2] == "T", "stopped")
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)
        try:
            proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _first_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """The first line ``proc`` writes to stderr, or "" when none came within ``timeout`` seconds."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    return proc.stderr.readline() if ready else ""


def _spawn(workspace: Workspace, command: str) -> subprocess.Popen[str]:
    """``command`` of the workspace's profile, running, its output piped."""
    return subprocess.Popen(
        workspace.command(command, "--profile", workspace.profile),
        env=workspace.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _env(workspace: Workspace, makelevel: str | None) -> dict[str, str]:
    env = {k: v for k, v in workspace.env.items() if k != "MAKELEVEL"}
    return env if makelevel is None else {**env, "MAKELEVEL": makelevel}


def _run(workspace: Workspace, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(workspace.command(*args), env=env, capture_output=True, text=True, timeout=TIMEOUT)


def reset_at_its_door(workspace: Workspace) -> str:
    """The code of a reset that shuts the workspace's database door (TAKE held) and stops itself there (for
    ``_stopped``); continued, it opens the door and ends."""
    return f"""
        import os, signal
        import psycopg
        from refresher._snapshot_sql import TAKE, _close_door, _lock
        db = {workspace.profile!r}
        with psycopg.connect({workspace.dsn().rsplit("/", 1)[0] + "/postgres"!r}, autocommit=True) as conn:
            _lock(conn, db, TAKE)
            oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (db,)).fetchone()[0]
            assert _close_door(conn, db, oid)
            print("closed", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            conn.execute(f'ALTER DATABASE "{{db}}" WITH ALLOW_CONNECTIONS true')
    """


def says_what_it_waits_for(proc: subprocess.Popen[str], *words: str) -> None:
    """Assert ``proc``'s first line on stderr has each of ``words`` and "waiting for it", ``proc`` still running
    (waiting); reaped on a failure."""
    try:
        line = _first_line(proc)
        assert all(word in line for word in (*words, "waiting for it")), line
        assert proc.poll() is None
    except BaseException:
        reap(proc)
        raise


@pytest.mark.slow
def test_a_start_or_stop_held_by_a_stopped_command_is_waited_for_saying_so(workspace: Workspace) -> None:
    # A server stopped (a reboot) and a command stopped (Ctrl-Z) while starting it, in the engine's lock: `url`,
    # `reset` and `refresh` waited for that lock without a word, and with --no-wait too, for good.
    workspace.refresh()
    pgdata = workspace.root / "state" / "local" / workspace.profile / "pgdata"
    running = Postmaster.read(pgdata)
    assert running is not None
    os.kill(running.pid, signal.SIGINT)
    deadline = time.monotonic() + TIMEOUT
    while (pgdata / "postmaster.pid").exists():
        assert time.monotonic() < deadline, "the server never stopped"
        time.sleep(0.05)
    holder = f"""
        import os, signal
        from pathlib import Path
        from refresher.engines._common import locked
        with locked(Path({str(pgdata.parent.parent / f".{workspace.profile}.lock")!r})):
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    """
    waiting: subprocess.Popen[str] | None = None
    try:  # reaped also when the holder's end fails (_stopped's exit), its pipes with it
        with _stopped(holder, workspace.env):
            for makelevel in (None, "1"):
                env = _env(workspace, makelevel)
                for command in ("url", "reset", "refresh"):
                    done = _run(workspace, env, command, "--profile", workspace.profile, "--no-wait")
                    assert done.returncode == 2, (command, done.stderr)
                    assert done.stdout == "" and done.stderr.count("\n") == 1, (command, done.stderr)
                    assert STARTING in done.stderr and "without --no-wait" in done.stderr, (
                        command,
                        done.stderr,
                    )
            waiting = _spawn(workspace, "url")
            says_what_it_waits_for(waiting, STARTING)
        [(out, err)] = outputs([waiting], TIMEOUT)
    finally:
        reap(waiting)
    assert waiting.returncode == 0 and out.startswith("postgresql://"), err


@pytest.mark.slow
def test_down_during_a_first_refresh_stopped_in_its_start_says_what_it_waits_for(
    workspace: Workspace,
) -> None:
    # A first refresh stopped (Ctrl-Z) after making its cluster, before starting its server: `down` waited for
    # the engine's lock it held, without a word.
    state = workspace.root / "state"
    refresh = _spawn(workspace, "refresh")
    down: subprocess.Popen[str] | None = None
    try:
        _stop_when(refresh, lambda: made_in_start(state, workspace.profile), "made its cluster")
        down = _spawn(workspace, "down")
        line = _first_line(down)
        assert STARTING in line and "(perhaps stopped: Ctrl-Z); waiting for it" in line, line
        assert down.poll() is None
        refresh.send_signal(signal.SIGCONT)
        _, err = down.communicate(timeout=TIMEOUT)
        assert down.returncode == 0, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            refresh.send_signal(signal.SIGCONT)
        reap(refresh, down)


@pytest.mark.slow
def test_status_answers_while_a_reset_is_stopped_with_its_database_closed(workspace: Workspace) -> None:
    # A reset stopped (Ctrl-Z) between closing the database's door and its swap holds TAKE: `status` waited for
    # it to open a door it took for a killed reset's, for good.
    workspace.refresh()
    with _stopped(reset_at_its_door(workspace), workspace.env):
        for args in (("status",), ("status", "--profile", workspace.profile)):
            done = _run(workspace, workspace.env, *args)
            assert done.returncode == 0, done.stderr
            assert workspace.profile in done.stdout and "running" in done.stdout, done.stdout


@pytest.mark.slow
def test_plan_behind_a_stopped_resets_shut_door_says_what_it_waits_for(workspace: Workspace) -> None:
    # A reset stopped (Ctrl-Z) with the database's door shut holds TAKE: `plan` waited for it DOOR_WAIT_SECONDS
    # (30 s) without a word, then failed saying a reset held it.
    workspace.refresh()
    plan: subprocess.Popen[str] | None = None
    try:  # reaped also when the holder's end fails (_stopped's exit), its pipes with it
        with _stopped(reset_at_its_door(workspace), workspace.env):
            plan = _spawn(workspace, "plan")
            says_what_it_waits_for(plan, f"database {workspace.profile} refuses sessions", "a reset")
        [(_, err)] = outputs([plan], TIMEOUT)
    finally:
        reap(plan)
    assert plan.returncode == 0, err


def test_no_wait_beside_a_running_refresh_answers_at_once(workspace: Workspace) -> None:
    # A refresh or reset holds its profile's lock for the whole command: `refresh`, `reset` and `url` with
    # --no-wait beside one were given the grace of the engine's lock first (HOLD_GRACE_SECONDS, 1 s), for a lock
    # no moment frees. That grace is ten minutes here (_LONG_GRACE): a command given it fails by its TIMEOUT.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from refresher.profile_lock import hold_profile
                with hold_profile(Path({str(workspace.root / "state")!r}), {workspace.profile!r}):
                    print("held", flush=True)
                    sys.stdin.read()
            """),
        ],
        env=workspace.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline(), "the holder never took its lock"
        for makelevel in (None, "1"):
            for command in ("refresh", "reset", "url"):
                args = (command, "--profile", workspace.profile, "--no-wait", "--engine", workspace.engine)
                done = subprocess.run(
                    [sys.executable, "-c", _LONG_GRACE, *args],
                    env=_env(workspace, makelevel),
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
                assert done.returncode == 2, (command, done.stderr)
                assert done.stdout == "" and done.stderr.count("\n") == 1, (command, done.stderr)
                busy = "another refresh or reset is running"
                assert busy in done.stderr and "without --no-wait" in done.stderr, (command, done.stderr)
    finally:
        outputs([holder], TIMEOUT)  # its stdin closed: it lets the lock go and ends


@pytest.mark.slow
def test_a_new_cluster_does_not_wait_for_good_for_a_template_held_by_a_stopped_start() -> None:
    # A first refresh stopped (Ctrl-Z) while copying the template into its new cluster held the template's lock:
    # every new cluster of this user (any profile, any checkout, the pytest plugin's) waited for it, for good, and
    # then TEMPLATE_WAIT_SECONDS without a word. The wait is 3 s here: told after 1 s (HOLD_GRACE_SECONDS).
    root = world_traversable_tmp("refresher-stopped-template-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = """
        import sys
        from pathlib import Path
        from refresher.engines import _pgtemplate
        from refresher.engines.local import LocalEngine
        _pgtemplate.TEMPLATE_WAIT_SECONDS = 3.0
        engine = LocalEngine(Path(sys.argv[1]) / "state", template_dir=Path(sys.argv[1]) / "templates")
        if sys.argv[3] == "stop":
            engine.stop(sys.argv[2])
        else:
            print(engine.start(sys.argv[2], on_wait=lambda line: print(line, file=sys.stderr)).port)
    """

    def engine(profile: str, action: str = "start") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(start), str(root), profile, action],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    try:
        assert engine("tpl_first").returncode == 0  # the template made, for the next new cluster to copy
        (lock,) = [p for p in (root / "templates").glob(".*.lock") if not p.name.endswith(".spare.lock")]
        holder = f"""
            import os, signal
            from pathlib import Path
            from refresher.engines._common import locked
            with locked(Path({str(lock)!r})):
                print("held", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
        """
        with _stopped(holder, env):
            done = engine("tpl_second")
            assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert "template cache" in done.stderr and "waiting for it, 3 s at most" in done.stderr
    finally:
        for profile in ("tpl_first", "tpl_second"):
            engine(profile, "stop")


def test_a_run_without_reuse_does_not_wait_for_a_kept_server_a_stopped_run_is_building() -> None:
    # A pytest run with --refresher-reuse stopped (Ctrl-Z) while building its kept server held the record's lock:
    # a run without the option, which drops kept servers before it builds its own, waited for it, for good.
    root = world_traversable_tmp("refresher-stopped-kept-")
    record = root / "state" / "kept" / "server.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = f"""
        import os, signal
        from filelock import FileLock
        with FileLock({str(record.with_suffix(".lock"))!r}, thread_local=False):
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    """
    drop = f"""
        from pathlib import Path
        from refresher._pytest_reuse import drop_kept
        from refresher.settings import Settings
        state = Path({str(root / "state")!r})
        drop_kept(Path({str(record)!r}), Settings(state_dir=state, store_root=state, profiles_dirs=()))
    """
    with _stopped(holder, env):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(drop)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
    assert record.exists()  # in use: left to the next run


@pytest.mark.slow
def test_a_manifest_held_by_a_stopped_process_is_waited_for_saying_so(workspace: Workspace) -> None:
    # A gc or a refresh stopped (Ctrl-Z) while writing the store's manifest holds its lock: `status --profile`,
    # `plan`, `warm`, `refresh` and the featurestore commands waited for it 600 s without a word.
    workspace.refresh()
    lock = workspace.root / "store" / "manifest.lock"
    holder = f"""
        import os, signal
        from pathlib import Path
        from featurestore._locks import file_lock
        with file_lock(Path({str(lock)!r})):
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    """
    waiting: list[subprocess.Popen[str]] = []
    try:  # reaped on every path, the holder's end failing (_stopped's exit) too, their pipes with them
        with _stopped(holder, workspace.env):
            waiting.append(_spawn(workspace, "status"))
            waiting.append(
                subprocess.Popen(
                    [sys.executable, "-m", "featurestore.cli", "stats", "--cache-root", str(lock.parent)],
                    env=workspace.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for proc in waiting:
                line = _first_line(proc)
                assert "another process holds its manifest" in line and "waiting for it" in line, line
                assert proc.poll() is None
        ended = outputs(waiting, TIMEOUT)
    finally:
        reap(*waiting)
    for proc, (_, err) in zip(waiting, ended, strict=True):
        assert proc.returncode == 0, err
