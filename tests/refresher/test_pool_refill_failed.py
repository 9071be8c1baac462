"""A detached refill that fails, or is killed outright, says so in `refresher status` (and its --json) until a later
one fills the pool, and one running says that:
its output goes to /dev/null after a CLI refresh or reset, and a short pool then made resets copy without a word.
The record (``pool._record_outcome``) keeps the latest end of concurrent refills and is never seen half-written,
a writer killed midway included; a container's record (in the user's cache) goes with its server at `down`, and a
server made later at its address and database claims none of it. Against real local servers and containers and
the real detached refill."""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import psycopg
import pytest
from psycopg import sql

import refresher.pool as pool_module
from refresher._snapshot_sql import COPIER
from refresher.engines import locked, noted_cluster, noted_servers, owner_labels
from refresher.engines.base import ServerInfo
from refresher.engines.docker import DockerEngine
from refresher.engines.local import free_port
from refresher.pool import (
    MAX_REFILL_CONCURRENCY,
    NO_REASON,
    OUTCOME_PREFIX,
    RUNNING_SUFFIX,
    _died,
    _forget_outcome_at,
    _last_failure,
    _outcome_path,
    _read_outcome,
    _record_outcome,
    _refill_notes,
    _refilling,
    _settled_path,
    pool_status,
)
from refresher.snapshot import pristine_name, save_pristine
from tests.fixtures_postgres import refillers, refills_gone
from tests.refresher.test_cli_stamp import wait_for_pool_databases
from tests.refresher.test_refresh_e2e import Workspace, workspace

pytestmark = pytest.mark.postgres

__all__ = ["workspace"]  # a fixture, imported to be found


def _status_pool(ws: Workspace) -> dict[str, object]:
    [server] = json.loads(ws.run("status", "--profile", ws.profile, "--json").stdout)["servers"]
    pool: dict[str, object] = server["pool"]
    return pool


def _refill_failed(ws: Workspace) -> object:
    return _status_pool(ws)["refill_failed"]


def _a_pool_of_one(ws: Workspace, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workspace refreshed with a pool of one clone, made and its refill ended; ``cache`` the cache directory,
    which the detached refill must be told (a container's record is kept there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert ws.refresh("--pool-size", "1")["pool_size"] == 1
    wait_for_pool_databases(ws, 1)
    refills_gone(ws.profile)


def _on_pristine(ws: Workspace) -> psycopg.Connection[object]:
    """A session on the pristine copy (which takes none: let in for a moment), so a CREATE DATABASE from it
    fails after the server's 5 s wait: "source database ... is being accessed by other users"."""
    pristine = sql.Identifier(pristine_name(ws.profile))
    with psycopg.connect(ws.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(pristine))
        try:
            return psycopg.connect(ws.server().dsn(pristine_name(ws.profile)))
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(pristine))


@pytest.mark.slow
def test_a_failed_refill_after_a_reset_shows_in_status_until_a_later_one_fills_the_pool(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = workspace
    _a_pool_of_one(ws, tmp_path, monkeypatch)
    assert _refill_failed(ws) is None
    blocker = _on_pristine(ws)
    try:
        assert json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)["method"] == "pool"
        refills_gone(ws.profile)  # the real detached refill, its output to /dev/null: it failed
        failed = _refill_failed(ws)
        assert isinstance(failed, str) and failed.startswith("the last refill ("), failed
        assert "being accessed by other users" in failed and "\n" not in failed, failed
        table = ws.run("status", "--profile", ws.profile).stdout
        assert f"{ws.profile}: the last refill (" in table and "0/1 ready, reset: copy" in table, table
    finally:
        blocker.close()
    ws.run("reset", "--profile", ws.profile)  # copies; its refill fills the pool
    refills_gone(ws.profile)
    assert _refill_failed(ws) is None
    assert "the last refill" not in ws.run("status", "--profile", ws.profile).stdout
    path = record_path(ws.server())
    assert path.read_text().endswith(" ok\n")
    assert path.is_relative_to(tmp_path) == (ws.engine == "docker"), path


@contextlib.contextmanager
def _copiers_held(ws: Workspace) -> Iterator[None]:
    """Every copy token of the pool (``pool._copier``: COPIER + k, k < MAX_REFILL_CONCURRENCY) held by a session
    of the test's (on the maintenance database: a reset ends the working database's sessions): a refill waits in
    its first copy, alive, until they are let go."""
    server = ws.server()
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        for k in range(MAX_REFILL_CONCURRENCY):
            conn.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (server.dbname, COPIER + k))
        yield


@pytest.mark.slow
def test_a_refill_killed_outright_shows_as_died_not_running_until_a_later_one_fills_the_pool(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refill SIGKILLed (the OOM killer) recorded nothing: status showed neither a failure nor a refill running
    ws = workspace
    _a_pool_of_one(ws, tmp_path, monkeypatch)
    with _copiers_held(ws):
        assert json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)["method"] == "pool"
        deadline = time.monotonic() + 60
        while not (refilling := refillers(ws.profile)) or _status_pool(ws)["refill_running"] is None:
            assert time.monotonic() < deadline, "the reset's refill never showed as running"
            time.sleep(0.2)
        [refill] = refilling
        pool = _status_pool(ws)
        assert pool["refill_failed"] is None and pool["ready"] == 0, pool
        assert str(pool["refill_running"]).startswith(f"a refill is running (pid {refill.pid}, since "), pool
        refill.kill()  # init's (double-forked): a zombie where nothing reaps orphans, which counts as gone
        while refillers(ws.profile):
            assert time.monotonic() < deadline, "the killed refill never ended"
            time.sleep(0.1)
        pool = _status_pool(ws)
        died = pool["refill_failed"]
        assert isinstance(died, str) and died.startswith("the refill started "), pool
        assert f"(pid {refill.pid}) died without recording how it ended" in died and "\n" not in died, died
        assert pool["refill_running"] is None, pool
        table = ws.run("status", "--profile", ws.profile).stdout
        assert f"{ws.profile}: {died}" in table and "0/1 ready, reset: copy" in table, table
    ws.run("reset", "--profile", ws.profile)  # copies; its refill fills the pool
    refills_gone(ws.profile)
    pool = _status_pool(ws)
    assert (pool["refill_failed"], pool["refill_running"], pool["ready"]) == (None, None, 1), pool
    path = record_path(ws.server())
    assert path.read_text().endswith(" ok\n")
    assert record_files(path) == [".lock", "record"]  # the killed one's note went with the end that covers it


def _record(dsn: str, db: str, ended: int, failure: str | None) -> None:
    _record_outcome(dsn, db, ended, failure)


def _record_announcing(dsn: str, db: str, ended: int, failure: str | None, marker: str) -> None:
    """``_record`` that touches ``marker`` when it is about to wait on the record's lock (``_outcome_locked``'s
    ``locked``): its parent can tell it is waiting there, not still starting (a spawned child may take seconds on
    a loaded machine) nor gone (``_record_outcome`` swallows its errors)."""
    real = locked

    @contextlib.contextmanager
    def announcing(path: Path) -> Iterator[None]:
        Path(marker).touch()
        with real(path):
            yield

    pool_module.locked = announcing
    _record_outcome(dsn, db, ended, failure)


def _killed_renaming(dsn: str, db: str) -> None:
    """``_record_outcome`` killed (SIGKILL) between writing its part and renaming it over the record."""
    os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[assignment]
    _record_outcome(dsn, db, 10**19, "killed midway")


def record_path(server: ServerInfo) -> Path:
    with psycopg.connect(server.dsn("postgres")) as conn:
        return _outcome_path(conn, server.dbname)


def test_concurrent_refills_keep_the_latest_end_and_a_killed_writer_leaves_the_record_whole(
    pg_database: ServerInfo,
) -> None:
    dsn, db = pg_database.dsn("postgres"), pg_database.dbname
    path = record_path(pg_database)
    directory = path.parent
    try:
        # Ten refills end at once, in no order: a failure that ended before a success is not the record.
        ends = [(1_000 + n, None if n == 7 else f"failure {n}") for n in range(10)]
        context = multiprocessing.get_context("spawn")
        with context.Pool(10) as workers:
            workers.starmap(_record, [(dsn, db, ended, failure) for ended, failure in reversed(ends)])
        assert path.read_text() == "1009 failed failure 9\n"
        assert _last_failure(path).endswith("failed: failure 9")
        _record(dsn, db, 1_005, "ended before the recorded one")
        assert path.read_text() == "1009 failed failure 9\n"
        _record(dsn, db, 1_010, None)
        assert _last_failure(path) == ""
        _record(dsn, db, 1_008, "ended before the success")
        assert _last_failure(path) == ""

        killed = context.Process(target=_killed_renaming, args=(dsn, db))
        killed.start()
        killed.join(60)
        assert killed.exitcode == -signal.SIGKILL
        assert path.read_text() == "1010 ok\n"  # the part it wrote is no record
        _record(dsn, db, 1_011, "after the kill")  # its lock went with it; its part is written over
        assert path.read_text() == "1011 failed after the kill\n"
    finally:
        for leftover in directory.glob(f"{path.name}*"):
            leftover.unlink()


def test_a_writer_waiting_on_a_lock_unlinked_while_held_takes_the_new_one(pg_database: ServerInfo) -> None:
    """``forget_outcome`` unlinks the record's lock while it holds it: a writer that opened that lock before and
    waited on it must not write once it is let go while another holds the lock now at the path.

    The writer is known to wait on the old lock (it says so before it asks, then a moment), and the new lock
    takes the old one's name at once (renamed over it, held already): a fixed sleep and an unlink, then an open,
    let a slow writer take a lock of its own in between, rightly, and write (a CI run failed so)."""
    dsn, db = pg_database.dsn("postgres"), pg_database.dbname
    path = record_path(pg_database)
    lock_path = path.with_name(f"{path.name}.lock")
    marker = path.with_name(f"{path.name}.waiting")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = multiprocessing.get_context("spawn").Process(
        target=_record_announcing, args=(dsn, db, 5, "the writer's", str(marker))
    )
    try:
        with lock_path.open("a") as old:
            fcntl.flock(old, fcntl.LOCK_EX)
            writer.start()
            deadline = time.monotonic() + 60
            while not marker.exists() and writer.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), f"the writer never asked for the lock (exit code {writer.exitcode})"
            time.sleep(0.5)  # it asks again and again, in vain, while the old lock is held
            staged = lock_path.with_name(f"{lock_path.name}.new")
            new = staged.open("a")
            fcntl.flock(new, fcntl.LOCK_EX)
            os.replace(staged, lock_path)  # the old inode unlinked, the new one at its name at once
        with new:  # the old one let go: the writer holds an inode nobody locks now
            writer.join(2)
            assert writer.is_alive() and not path.exists()  # fails before: it wrote under the old lock
        writer.join(60)
        assert writer.exitcode == 0 and path.read_text() == "5 failed the writer's\n"
    finally:
        writer.join(60)
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()


def test_a_record_that_is_no_record_claims_no_failure(tmp_path: Path) -> None:
    path = _settled_path(tmp_path, "db", OUTCOME_PREFIX)
    assert _last_failure(path) == ""
    for text in ("", "garbage\n", "x failed boom\n", "bodies 12 1 x\n"):
        path.write_text(text)
        assert _last_failure(path) == "", text
    path.write_text("12 failed boom: it broke\n")
    assert _last_failure(path).endswith("failed: boom: it broke")


def test_a_failure_recorded_without_its_line_is_a_failure(tmp_path: Path) -> None:
    """A record "<ended> failed" with no line after it read as no failure: status said nothing of a refill recorded as
    failed. It is one, with no reason recorded."""
    path = _settled_path(tmp_path, "db", OUTCOME_PREFIX)
    for text in ("12 failed\n", "12 failed \n", "12 failed"):
        path.write_text(text)
        assert _read_outcome(path) == (12, NO_REASON), text
        assert _last_failure(path).endswith(f"failed: {NO_REASON}"), text
    path.write_text("12 failed\nbodies 13 2 no COPY body for x\n")
    assert _read_outcome(path) == (12, NO_REASON)


def test_the_bodies_line_and_the_outcome_keep_each_other_in_one_record(pg_database: ServerInfo) -> None:
    """``_record_bodies`` writes its line after the outcome's and keeps it, ``_record_outcome`` keeps the bodies'
    line, each under the latest-end rule of its own; 0 not made clears the line (the record goes when it was all
    there was). A reader before the line reads the outcome of the first line (``split(" ", 2)`` of the whole
    text, as 3e93417's reader): an ok as ok, a failure followed by the bodies' line; the line alone is no record."""
    dsn, db = pg_database.dsn("postgres"), pg_database.dbname
    path = record_path(pg_database)

    def older_reader() -> tuple[int, str | None] | None:
        try:
            ended, outcome, *rest = path.read_text().rstrip("\n").split(" ", 2)
            return (int(ended), rest[0] if outcome == "failed" and rest else None)
        except (OSError, ValueError):
            return None

    try:
        pool_module._record_bodies(dsn, db, 20, 2, "no COPY body for KO/1m/2024-01: gone")
        assert path.read_text() == "bodies 20 2 no COPY body for KO/1m/2024-01: gone\n"
        assert _read_outcome(path) is None and older_reader() is None
        assert "could not make 2 COPY bodies" in pool_module._bodies_line(path)
        _record(dsn, db, 10, None)
        assert path.read_text() == "10 ok\nbodies 20 2 no COPY body for KO/1m/2024-01: gone\n"
        assert _read_outcome(path) == (10, None) and older_reader() == (10, None)
        pool_module._record_bodies(dsn, db, 15, 0, "")  # ended before the recorded line: left
        assert "could not make 2" in pool_module._bodies_line(path)
        _record(dsn, db, 30, "boom")
        assert _read_outcome(path) == (30, "boom") and "could not make 2" in pool_module._bodies_line(path)
        older = older_reader()
        assert older is not None and older[1] is not None and older[1].startswith("boom\nbodies 20 2")
        pool_module._record_bodies(dsn, db, 40, 0, "")
        assert path.read_text() == "30 failed boom\n" and pool_module._bodies_line(path) == ""
        _forget_outcome_at(path)
        pool_module._record_bodies(dsn, db, 50, 1, "x")
        pool_module._record_bodies(dsn, db, 60, 0, "")
        assert not path.exists()
    finally:
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()


def test_a_refills_note_tells_running_from_died_a_reused_pid_and_a_zombie_too(tmp_path: Path) -> None:
    # pool._running's notes as status reads them, beside a record at ``path``
    path = _settled_path(tmp_path, "db", OUTCOME_PREFIX)

    def note(pid: int, started: int, labels: dict[str, str]) -> None:
        (tmp_path / f"{path.name}{RUNNING_SUFFIX}{pid}").write_text(
            json.dumps({"started": started, **labels})
        )

    def lines() -> tuple[str, str]:
        notes = _refill_notes(path)
        return _died(path, notes), _refilling(notes)

    note(os.getpid(), 100, owner_labels(os.getpid()))
    died, running = lines()
    assert died == "" and running.startswith(f"a refill is running (pid {os.getpid()}, since "), running
    # the same pid, another process (reused since): its refill is gone
    (tmp_path / f"{path.name}{RUNNING_SUFFIX}{os.getpid()}").unlink()
    reused = {
        key: "1" if key.endswith(".started") else value for key, value in owner_labels(os.getpid()).items()
    }
    note(os.getpid(), 200, reused)
    died, running = lines()
    assert died.startswith("the refill started ") and f"(pid {os.getpid()}) died without recording" in died, (
        died
    )
    assert running == ""
    # a refill that ended after it started says how the pool was left; one killed after that end is said again
    path.write_text("300 ok\n")
    assert lines() == ("", "")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        note(child.pid, 400, owner_labels(child.pid))
        assert lines()[1].startswith(f"a refill is running (pid {child.pid}, ")
        child.kill()  # not reaped: a zombie, as a killed refill is where no init reaps orphans
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        died, running = lines()
        assert f"(pid {child.pid}) died" in died and running == "", (died, running)  # fails before: running
    finally:
        child.wait()
    # what is no note is none
    (tmp_path / f"{path.name}{RUNNING_SUFFIX}7").write_text("garbage")
    (tmp_path / f"{path.name}{RUNNING_SUFFIX}8.part").write_text(json.dumps({"started": 500}))
    assert sorted(note.pid for note in _refill_notes(path)) == sorted([os.getpid(), child.pid])


def record_files(path: Path) -> list[str]:
    """The record at ``path`` and what is beside it: its lock, a leftover part."""
    return sorted(p.name[len(path.name) :] or "record" for p in path.parent.glob(f"{path.name}*"))


def _two_checkouts(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    port: int | None = None,
) -> tuple[DockerEngine, DockerEngine]:
    """This checkout's engine (``docker_engine``'s state dir; ``port`` pins its server's) and another checkout's
    (its own state dir) on the same daemon: a profile's servers of both, their records in one cache directory
    (``tmp_path``/cache), as the CLI's refill is told (``spawn_refill``)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def engine(state_dir: Path, port: int | None = None) -> DockerEngine:
        image, prefix = docker_engine.image, docker_engine.prefix
        return DockerEngine(state_dir, image=image, client=docker_client, prefix=prefix, port=port)

    return engine(docker_engine.state_dir, port), engine(tmp_path / "other-checkout")


@pytest.mark.docker
def test_down_removes_a_containers_record_alone_and_a_server_made_later_there_claims_no_failure(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = _two_checkouts(docker_engine, docker_client, tmp_path, monkeypatch, port=free_port())
    try:
        info, other = ours.start("refilled"), theirs.start("refilled")
        for server in (info, other):
            _record(server.dsn("postgres"), server.dbname, 1_000, f"failed on {server.port}")
        path, their_path = record_path(info), record_path(other)
        assert path.is_relative_to(tmp_path / "cache") and path != their_path
        path.with_name(f"{path.name}.part").write_text("1001 half")  # a writer killed before its rename
        assert record_files(path) == [".lock", ".part", "record"]

        assert ours.stop("refilled")
        assert record_files(path) == []  # fails before: `down` left all three
        assert _last_failure(their_path).endswith(f"failed: failed on {other.port}")

        # A server whose files stayed (its container and volume removed by hand, not by `down`) ...
        info = ours.start("refilled")
        _record(info.dsn("postgres"), info.dbname, 1_002, "the old server's failure")
        assert _last_failure(record_path(info)).endswith("failed: the old server's failure")
        docker_client.containers.get(f"{ours.prefix}-{ours.scope}-refilled").remove(force=True, v=True)
        docker_client.volumes.get(f"{ours.prefix}-{ours.scope}-refilled-data").remove(force=True)
        # ... and a new one at the same address and database: its status claims none of the old one's failure.
        again = ours.start("refilled")
        assert (again.host, again.port, again.dbname) == (info.host, info.port, info.dbname)
        assert _last_failure(record_path(again)) == ""  # fails before: keyed by address and database alone
    finally:
        ours.stop("refilled")
        theirs.stop("refilled")
    assert _last_failure(their_path) == ""  # theirs went with their server


@pytest.mark.docker
@pytest.mark.parametrize("gone", ["stopped", "removed", "removed with its volume"])
def test_down_removes_the_records_of_a_container_stopped_or_removed_by_hand_and_no_other_checkouts(
    gone: str,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`docker stop`, `docker rm` (a daemon restart stops it too): `down` cannot ask a server that does not answer
    its cluster, which keys its records; the start noted it. Another checkout's server and records stay."""
    ours, theirs = _two_checkouts(docker_engine, docker_client, tmp_path, monkeypatch)
    try:
        info, other = ours.start("refilled"), theirs.start("refilled")
        for server in (info, other):
            _record(server.dsn("postgres"), server.dbname, 1_000, f"failed on {server.port}")
        path, their_path = record_path(info), record_path(other)
        path.with_name(f"{path.name}.part").write_text("1001 half")  # a writer killed before its rename
        assert record_files(path) == [".lock", ".part", "record"]
        container = docker_client.containers.get(f"{ours.prefix}-{ours.scope}-refilled")
        if gone == "stopped":
            container.stop(timeout=10)
        else:
            container.remove(force=True, v=True)
            if gone == "removed with its volume":
                docker_client.volumes.get(f"{ours.prefix}-{ours.scope}-refilled-data").remove(force=True)

        assert ours.stop("refilled")
        assert record_files(path) == []  # fails before: `down` left all three
        assert not list((ours.state_dir / "docker").glob("refilled.*"))
        assert record_files(their_path) == [".lock", "record"]
        assert _last_failure(their_path).endswith(f"failed: failed on {other.port}")
        assert theirs.info("refilled") is not None  # their container untouched, still running
    finally:
        ours.stop("refilled")
        theirs.stop("refilled")
    assert record_files(their_path) == []  # theirs went with their server


def test_records_with_fields_a_newer_refresher_adds_are_read(tmp_path: Path) -> None:
    """The outcome record (one line; a failure's is the rest of its line), a running refill's note and the state
    dir's note of the servers a profile ran (``note_server``): a word or a field after those this refresher knows
    is read as absent. Each was so already."""
    path = _settled_path(tmp_path, "db", OUTCOME_PREFIX)
    path.write_text("12 ok newer=1\n")
    assert _read_outcome(path) == (12, None)  # already so before
    path.write_text("12 newer-outcome x\n")
    assert _read_outcome(path) == (12, None)  # an outcome it does not know claims no failure
    # A running refill's note (JSON): a key it does not know is left out; this process runs, so it is running.
    note = path.with_name(f"{path.name}{RUNNING_SUFFIX}{os.getpid()}")
    note.write_text(json.dumps({"started": 13, **owner_labels(os.getpid()), "newer": {"x": 1}}))
    assert [(n.started, n.pid, n.gone) for n in _refill_notes(path)] == [(13, os.getpid(), False)]
    # The servers' note: after the address, the cluster and the container's id (none where noted without it).
    noted = tmp_path / "p.clusters"
    servers = [["127.0.0.1", 5432, 7, "c0ffee", "newer"], ["127.0.0.1", 5433, 9], ["::1", "x", 8]]
    noted.write_text(json.dumps({"servers": servers, "newer": 1}))
    assert noted_servers(noted) == [["127.0.0.1", 5432, 7, "c0ffee"], ["127.0.0.1", 5433, 9]]
    assert noted_cluster(noted_servers(noted), "127.0.0.1", 5432, "c0ffee") == 7
    assert noted_cluster(noted_servers(noted), "127.0.0.1", 5433, "c0ffee") is None  # no container noted
    for broken in ("{", "[]", '{"servers": 3}'):
        noted.write_text(broken)
        assert noted_servers(noted) == []


@pytest.mark.docker
def test_status_of_a_noted_container_asks_not_its_cluster_and_finds_its_record(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every `refresher status` of a container (``pool_status`` of the engine's ``info``) asked its server its
    cluster (pg_control_system), which keys its record: the start notes it with the container's id."""
    ours, _theirs = _two_checkouts(docker_engine, docker_client, tmp_path, monkeypatch, port=free_port())
    asked: list[int] = []
    ask = pool_module._cluster

    def counted(conn: psycopg.Connection[object]) -> int | None:
        asked.append(conn.info.port)
        return ask(conn)

    try:
        started = ours.start("noted")
        save_pristine(started, pool_size=0)  # a pool: status reads its record
        _record(started.dsn("postgres"), started.dbname, 1_000, "the noted server's")
        path = record_path(started)
        monkeypatch.setattr(pool_module, "_cluster", counted)
        info = ours.info("noted")
        assert info is not None and info.cluster is not None and info.cluster == started.cluster
        assert pool_status(info).failed.endswith("failed: the noted server's")
        assert asked == []  # fails before: one question each status
        # Its container stopped and started again by a start: the same container, so the same cluster.
        docker_client.containers.get(f"{ours.prefix}-{ours.scope}-noted").stop(timeout=10)
        again = ours.start("noted")
        assert (again.port, again.cluster) == (started.port, started.cluster) and asked == []
        assert pool_status(again).failed.endswith("failed: the noted server's") and asked == []
        # Noted without its container (by a refresher before this one): asked, and the same record found; the
        # next start notes the container, and status asks no more.
        note = ours.state_dir / "docker" / "noted.clusters"
        note.write_text(json.dumps({"servers": [[again.host, again.port, again.cluster]]}))
        info = ours.info("noted")
        assert info is not None and info.cluster is None
        assert pool_status(info).failed.endswith("failed: the noted server's") and asked == [info.port]
        assert ours.start("noted").cluster == started.cluster and len(asked) == 2
        info = ours.info("noted")
        assert info is not None and info.cluster == started.cluster
        assert pool_status(info).failed.endswith("failed: the noted server's") and len(asked) == 2
    finally:
        ours.stop("noted")
    assert record_files(path) == []
