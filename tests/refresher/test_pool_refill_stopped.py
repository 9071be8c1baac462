"""A detached refill stopped politely (SIGTERM: a service manager, `kill PID`, a shutdown; SIGINT or SIGHUP sent
to it: a Ctrl-C at a terminal cannot reach it, it runs in a session of its own) while it copies clones, analyzes
the pristine copy (or the working database beside it), makes COPY bodies, writes its outcome record or waits for a server that does not answer: `refresher status` says it was stopped (neither "running" for good, nor "died ...
SIGKILL", nor nothing), no half-made clone is left in the server, no temporary or part file and no note stays,
the bodies' list stays for the next refill, a reset restores the loaded data exactly, and the next refill
finishes the job. Against real local servers, the real detached refill (the clone's step) and the refill's real
``main`` in a process of its own, stopped at a step by a hook (the bodies' and the record's steps), as
``test_refresh_batches`` stops one with a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from featurestore import FeatureStore
from refresher import bodies, body_keys, pool
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from refresher.pool import _refill_notes, pool_status, refill_pool, resize_pool, wait_for_pool
from refresher.refresh import refresh
from refresher.snapshot import pristine_name, restore_pristine
from tests.fixtures_postgres import refillers, refills_gone
from tests.refresher.test_pool_refill_failed import (
    _a_pool_of_one,
    _on_pristine,
    _status_pool,
    record_files,
    record_path,
)
from tests.refresher.test_refresh_batches import FRIDAY, _profile, root
from tests.refresher.test_refresh_e2e import CHECKSUMS, Workspace, workspace

pytestmark = pytest.mark.postgres

__all__ = ["root", "workspace"]  # fixtures, imported to be found


def _databases(server: ServerInfo) -> list[str]:
    """The databases of ``server`` that belong to its profile's database (its pristine copy, pool, trash)."""
    with psycopg.connect(server.dsn("postgres")) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (server.dbname,)
        ).fetchall()
    return [str(name) for (name,) in rows]


def _copying(server: ServerInfo) -> int:
    """How many sessions of ``server`` are in a CREATE DATABASE now."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query ILIKE 'CREATE DATABASE%%'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
@pytest.mark.parametrize("workspace", ["local"], indirect=True)  # the step is the server's, not its engine's
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_refill_stopped_while_it_copies_a_clone_says_so_leaves_no_clone_and_the_next_one_fills(
    workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    # Before: SIGTERM and SIGHUP ended it on the spot (status: "died ... (killed outright: SIGKILL, the OOM
    # killer?)"); SIGINT was ignored (``sh -c '... &'`` starts it with SIGINT ignored) and the refill went on (here: failed on the
    # session on the pristine copy).
    ws = workspace
    _a_pool_of_one(ws, tmp_path, monkeypatch)
    loaded = ws.checksums()
    server = ws.server()
    blocker = _on_pristine(ws)  # the refill's CREATE DATABASE waits 5 s on it in the server: a copy under way
    try:
        assert json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)["method"] == "pool"
        deadline = time.monotonic() + 60
        while not (refilling := refillers(ws.profile)) or not _copying(server):
            assert time.monotonic() < deadline, "the reset's refill never copied"
            time.sleep(0.05)
        [refill] = refilling
        # Its own session and process group: a Ctrl-C at our terminal (our process group's SIGINT) reaches it not.
        assert os.getsid(refill.pid) != os.getsid(0) and os.getpgid(refill.pid) != os.getpgid(0)
        refill.send_signal(signum)
        refills_gone(ws.profile)
    finally:
        blocker.close()
    pool_json = _status_pool(ws)
    stopped = pool_json["refill_failed"]
    assert isinstance(stopped, str) and stopped.startswith("the last refill ("), pool_json
    assert f"stopped by {signum.name} before it filled the pool" in stopped and "\n" not in stopped, stopped
    assert (pool_json["refill_running"], pool_json["ready"]) == (None, 0), pool_json
    table = ws.run("status", "--profile", ws.profile).stdout
    assert f"{ws.profile}: {stopped}" in table and "0/1 ready, reset: copy" in table, table
    # No clone half-made (the CREATE cancelled in the server), no part or note beside the record.
    assert _databases(server) == [ws.profile, pristine_name(ws.profile)]
    assert record_files(record_path(server)) == [".lock", "record"]
    ws.run("reset", "--profile", ws.profile)  # copies; its refill fills the pool
    assert ws.checksums() == loaded
    refills_gone(ws.profile)
    pool_json = _status_pool(ws)
    assert (pool_json["refill_failed"], pool_json["refill_running"], pool_json["ready"]) == (None, None, 1)
    assert record_files(record_path(server)) == [".lock", "record"]


# The refill's ``main`` with a hook that touches argv[2] and waits there (60 s at most) at the step argv[1]:
# "renaming" between a batch of bodies' temporaries and their rename, "between" after one body is published and
# before the next is made, "recording" between the outcome record's part and its rename (until the signal came:
# the record is written whole, then the stop raised), "unrecorded" there too, then that rename fails (ENOSPC: a
# full disk; later ones go through), "noting" between the running note's part and its rename, "analyzing" as the pristine copy's analyzed copy is
# analyzed (``_analyze_pristine``: made, connected to), "beside" there too, the thread analyzing the working
# database beside it held in the server (pg_sleep(300), a large ANALYZE); "connecting" touches it as its first
# connection starts, its timeout 120 s (the usual 10 s), and does not wait; "copying" only makes it copy two clones
# at once (``refill_concurrency`` 2), "failing" too, its main thread's copy failing at once (after touching it),
# "marking" too, its main thread waiting in its copy, then 1 s more as the stop unwinds it, while the helper's copy,
# once made (argv[2] + ".helper" touched), is marked only once the stop was raised; then argv[3:] to ``main``.
HOOKED = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import psycopg
    from featurestore import FeatureStore, _files
    from refresher import bodies, pool

    step, marker = sys.argv[1], Path(sys.argv[2])

    def wait_here():
        marker.touch()
        deadline = time.monotonic() + 60
        while getattr(getattr(pool, "_STOPS", None), "signum", None) is None and time.monotonic() < deadline:
            time.sleep(0.05)

    if step == "renaming":
        publish_many = _files.publish_many
        def publishing(moves):
            wait_here()
            publish_many(moves)
        _files.publish_many = publishing
    elif step == "between":
        bodies._PUBLISHED = 1
        put_bodies = FeatureStore.put_bodies
        def putting(self, items, layout):
            written = put_bodies(self, items, layout)
            wait_here()
            return written
        FeatureStore.put_bodies = putting
    elif step in ("recording", "unrecorded"):
        replace, failed = os.replace, []
        def replacing(src, dst):
            name = Path(src).name
            if name.startswith(pool.OUTCOME_PREFIX) and name.endswith(".part") and pool.RUNNING_SUFFIX not in name:
                if step == "unrecorded" and not failed:
                    wait_here()
                    failed.append(src)
                    raise OSError(28, "No space left on device")
                if step == "recording":
                    wait_here()
            return replace(src, dst)
        os.replace = replacing
    elif step == "noting":
        replace = os.replace
        def noting(src, dst):
            if pool.RUNNING_SUFFIX in Path(src).name and Path(src).name.endswith(".part"):
                wait_here()
            return replace(src, dst)
        os.replace = noting
    elif step in ("analyzing", "beside"):
        analyze_stale = pool.analyze_stale
        def analyzing(conn, *args, **kwargs):
            if threading.current_thread() is threading.main_thread():  # not the working database's, beside it
                wait_here()
            return analyze_stale(conn, *args, **kwargs)
        pool.analyze_stale = analyzing
        if step == "beside":
            wait_past_autovacuum = pool.wait_past_autovacuum
            def holding(conn):
                conn.execute("SELECT pg_sleep(300)")
                wait_past_autovacuum(conn)
            pool.wait_past_autovacuum = holding
    elif step in ("copying", "failing", "marking"):
        pool.refill_concurrency = lambda cpus, rotational: 2
    if step == "failing":
        make_clone = pool._make_clone
        def failing(*args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                marker.touch()
                raise RuntimeError("the main thread's copy failed")
            return make_clone(*args, **kwargs)
        pool._make_clone = failing
    elif step == "marking":
        create_from = pool._create_from
        def creating(*args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                try:
                    wait_here()
                except BaseException:
                    time.sleep(1)
                    raise
                return create_from(*args, **kwargs)
            create_from(*args, **kwargs)
            Path(f"{marker}.helper").touch()
            deadline = time.monotonic() + 60
            while not pool._STOPS._raised and time.monotonic() < deadline:
                time.sleep(0.01)
        pool._create_from = creating
    elif step == "connecting":
        connect = psycopg.connect
        def connecting(*args, **kwargs):
            marker.touch()
            return connect(*args, **{**kwargs, "connect_timeout": 120})
        psycopg.connect = connecting
    sys.exit(pool.main(sys.argv[3:]))
    """
)


def _stopped_at(
    step: str,
    server: ServerInfo,
    args: list[str],
    tmp_path: Path,
    at: Callable[[], bool] | None = None,
    *,
    script: str = HOOKED,
    signum: signal.Signals | None = signal.SIGTERM,
) -> int:
    """Run the hooked refill (``script``, as ``HOOKED``) of ``server`` with ``args``, send it ``signum`` (None:
    none) at ``step`` (once ``at`` says so, when given); its exit code."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PGPASSWORD": server.password}
    marker = tmp_path / f"{step}.at"
    argv = [
        "refill",
        "--dsn",
        server.dsn("postgres", with_password=False),
        "--database",
        server.dbname,
        *args,
    ]
    refill = subprocess.Popen(
        [sys.executable, "-c", script, step, str(marker), *argv], cwd=repo, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (marker.exists() if at is None else at()):
            assert refill.poll() is None, f"the refill ended ({refill.returncode}) before {step}"
            assert time.monotonic() < deadline, f"the refill never came to {step}"
            time.sleep(0.05)
        if signum is not None:
            refill.send_signal(signum)
        try:
            return refill.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the refill at {step} had not ended 60 s after it (signal: {signum})")
    finally:
        if refill.poll() is None:
            refill.kill()
            refill.wait()


def _held_back(
    root: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[LocalEngine, FeatureStore, Path]:
    """A cold refresh of profile ``name`` whose detached refill is held back (``spawn_refill`` patched): its
    engine, store and list of bodies to make (6: 3 symbols x 2 months of minute segments)."""
    monkeypatch.setattr(pool, "spawn_refill", lambda *args, **kwargs: None)
    engine, store = LocalEngine(root / "state"), FeatureStore(root / "store")
    refresh(_profile(root, name, FRIDAY), engine, store, state_dir=root / "state")
    monkeypatch.undo()
    keys = body_keys.keys_path(root / "state", name)
    assert len(body_keys.read(keys)[0]) == 6
    return engine, store, keys


@pytest.mark.parametrize(("step", "published"), [("renaming", 0), ("between", 1)])
def test_a_refill_stopped_while_it_makes_bodies_removes_its_temporaries_keeps_its_list_and_says_so(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, step: str, published: int
) -> None:
    # Before: SIGTERM ended it on the spot: the bodies' temporaries stayed (until a GC), its note stayed and status
    # said it "died ... (killed outright: SIGKILL, the OOM killer?)", and nothing said the bodies were not made.
    engine, store, keys = _held_back(root, monkeypatch, f"bodies_{step}")
    server = engine.start(keys.stem)
    listed = body_keys.read(keys)[0]
    stopped = _stopped_at(
        step, server, ["--no-fill", "--bodies", str(keys), "--store", str(store.root)], tmp_path
    )
    assert stopped == 128 + signal.SIGTERM  # it ended on its own, after its cleanup
    assert not list((store.root / "bodies").glob("*/.*"))  # no temporary
    assert store.get_cache_stats().bodies.entries == published
    assert body_keys.read(keys)[0] == listed and not body_keys.pending(keys)
    wait_for_pool(server, timeout=60, bodies=keys)  # list: none holds it; pool: may fill
    status = pool_status(server)
    # Counted: what has no body yet (6 before, "between" too, whose published body was counted not made).
    not_made = f"could not make {6 - published} COPY bodies: stopped by SIGTERM"
    assert status.bodies.startswith("the refill (") and not_made in status.bodies, status
    assert (status.failed, status.refilling) == ("", ""), status  # a --no-fill refill: no outcome of clones
    assert _refill_notes(record_path(server)) == []
    # The next refill makes them all, removes the list and clears the line.
    pool.spawn_refill(server, fill=False, bodies=(keys, store.root))
    wait_for_pool(server, timeout=120, bodies=keys)
    assert not keys.exists()
    assert len(store.read_bodies([each.key for each in listed], bodies.layout())) == 6
    assert pool_status(server).bodies == ""


def _stopped_recording(
    step: str, root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[ServerInfo, FeatureStore, Path]:
    """A cold refresh held back (``_held_back``), then its refill, filling the pool and to make the 6 bodies,
    SIGTERMed at ``step`` (its outcome record's write); it exited 143. Its server, store and list of bodies."""
    engine, store, keys = _held_back(root, monkeypatch, step)
    server = engine.start(keys.stem)
    args = ["--bodies", str(keys), "--store", str(store.root)]
    assert _stopped_at(step, server, args, tmp_path) == 128 + signal.SIGTERM
    return server, store, keys


def test_a_refill_stopped_while_it_writes_its_outcome_writes_it_whole_and_no_part(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: SIGTERM between the record's part and its rename ended it there: the part stayed, no outcome was
    # recorded, the note stayed and status said the refill "died ...".
    server, store, keys = _stopped_recording("recording", root, monkeypatch, tmp_path)
    path = record_path(server)
    assert record_files(path) == [".lock", "record"]  # no part, no note
    lines = path.read_text().splitlines()
    assert lines[0].endswith(" ok") and len(lines) == 2, lines  # the clones made; the bodies' line after it
    status = pool_status(server)
    assert (status.failed, status.refilling) == ("", ""), status
    assert len(status.ready) == status.target, status  # the pool filled, and no clone half-made beside it
    assert sorted(_databases(server)) == sorted(
        [server.dbname, pristine_name(server.dbname), *status.ready]
    ), _databases(server)
    assert "could not make 6 COPY bodies: stopped by SIGTERM" in status.bodies, status
    assert len(body_keys.read(keys)[0]) == 6  # kept for the next refill, which makes them
    pool.spawn_refill(server, bodies=(keys, store.root))
    wait_for_pool(server, timeout=120, bodies=keys)
    assert not keys.exists() and pool_status(server).bodies == ""


def test_a_refill_stopped_while_its_outcome_fails_to_be_written_stops_there(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: a stop held while the record was written was dropped when that write failed (``_Stops.held`` raised
    # it only after a block that did not raise; the record's writer suppresses OSError): the refill went on and
    # made every body, and the stop was raised only as its running note went, at the very end.
    server, store, keys = _stopped_recording("unrecorded", root, monkeypatch, tmp_path)
    assert store.get_cache_stats().bodies.entries == 0  # stopped there: no body made
    assert len(body_keys.read(keys)[0]) == 6 and not body_keys.pending(keys)
    status = pool_status(server)
    assert "could not make 6 COPY bodies: stopped by SIGTERM" in status.bodies, status
    assert (status.failed, status.refilling) == ("", ""), status  # no outcome could be written
    assert record_files(record_path(server)) == [".lock", "record"]  # the bodies' line's write took the part


def test_a_refill_stopped_while_it_analyzes_the_pristine_copy_drops_its_analyzed_copy_and_a_reset_restores(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the analyzed copy (a private pool slot's database, unmarked) stayed in the server until the next
    # refill's sweep: a whole copy of the pristine database's size.
    # The pristine copy not analyzed, as a refresh leaves it.
    engine, _, _ = _held_back(root, monkeypatch, "analyzing")
    server = engine.start("analyzing")
    with psycopg.connect(server.dsn()) as conn:
        loaded = conn.execute(CHECKSUMS).fetchall()
    assert _stopped_at("analyzing", server, [], tmp_path) == 128 + signal.SIGTERM
    assert _databases(server) == [server.dbname, pristine_name(server.dbname)]
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.ready, status
    assert record_files(record_path(server)) == [".lock", "record"]  # no part, no note
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'KO'")
    # A pool of one (auto: 0 here, and "fills the pool" held whatever the refill did).
    resize_pool(server, 1)
    restore_pristine(server)  # its refill analyzes the copy and fills the pool
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute(CHECKSUMS).fetchall() == loaded
    refills_gone(server.dbname)
    status = pool_status(server)
    assert (status.failed, status.target, len(status.ready)) == ("", 1, 1), status


def test_a_refill_stopped_while_it_writes_its_running_note_records_the_stop(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the stop, held while the note was written, was raised as its write ended, before the refill's
    # recording of a stop: nothing was recorded and status said nothing of the refill, the pool short.
    engine, _, _ = _held_back(root, monkeypatch, "noting")
    server = engine.start("noting")
    assert _stopped_at("noting", server, [], tmp_path) == 128 + signal.SIGTERM
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.refilling, status
    assert record_files(record_path(server)) == [".lock", "record"]  # the note written whole, then removed


def _sleeping(server: ServerInfo) -> int:
    """How many sessions of ``server`` are in a ``pg_sleep`` now (the hook's held analysis, ``HOOKED``)."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query ILIKE '%%pg_sleep(300)%%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_refill_stopped_while_it_analyzes_the_working_database_beside_cancels_that_analysis(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the stop halted the clones' helper threads alone; the thread analyzing the working database beside
    # the main thread ran its query to its end (300 s here; the wait below fails at 60 s) and then every queued
    # analysis, and a service manager SIGKILLed the refill ("died ... killed outright").
    engine, _, _ = _held_back(root, monkeypatch, "beside")
    server = engine.start("beside")
    marker = tmp_path / "beside.at"
    stopped = _stopped_at(
        "beside", server, [], tmp_path, at=lambda: marker.exists() and _sleeping(server) == 1
    )
    assert stopped == 128 + signal.SIGTERM
    deadline = time.monotonic() + 60  # the held query would run 300 s
    while _sleeping(server):
        assert time.monotonic() < deadline, "the working database's analysis still runs in the server"
        time.sleep(0.05)
    assert _databases(server) == [server.dbname, pristine_name(server.dbname)]
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.refilling, status
    assert record_files(record_path(server)) == [".lock", "record"]


def _two_to_copy(root: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> ServerInfo:
    """A server of profile ``name`` whose pristine copy is analyzed and whose pool of 2 has no clone yet."""
    engine, _, _ = _held_back(root, monkeypatch, name)
    server = engine.start(name)
    resize_pool(server, 2)
    refill_pool(server, size=0)  # the pristine copy analyzed, no clone made
    status = pool_status(server)
    assert (status.target, status.ready) == (2, ()), status
    return server


def _blocking_copies(server: ServerInfo) -> psycopg.Connection[Any]:
    """A transaction that holds the pristine copy's lock (its COMMENT, as it is): each CREATE DATABASE from it
    waits until it is closed."""
    pristine = pristine_name(server.dbname)
    blocker = psycopg.connect(server.dsn("postgres"))
    [mark] = blocker.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (pristine,)
    ).fetchone() or (None,)
    blocker.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(pristine), sql.Literal(mark))
    )
    return blocker


@pytest.mark.parametrize(("step", "copies"), [("copying", 2), ("failing", 1)])
def test_a_refill_stopped_while_clones_are_copied_cancels_the_copies_and_leaves_none(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, step: str, copies: int
) -> None:
    # Before, "copying": psycopg cancelled the main thread's CREATE DATABASE alone; the helper thread's ran on
    # (here: it waited on the lock below, and the refill with it, for good; once it ended, the helper marked its
    # clone). "failing" (the main thread's copy failed, and it waits for its helper): the helpers were halted
    # only for a stop raised while the main thread copied; one while it waited for them was recorded
    # ("stopped") while the helper's CREATE ran on in the server, then filled the pool.
    server = _two_to_copy(root, monkeypatch, step)
    pristine = pristine_name(server.dbname)
    marker = tmp_path / f"{step}.at"  # touched by "failing"'s failed copy
    blocker = _blocking_copies(server)
    try:
        stopped = _stopped_at(
            step,
            server,
            [],
            tmp_path,
            at=lambda: (step == "copying" or marker.exists()) and _copying(server) == copies,
        )
        assert stopped == 128 + signal.SIGTERM
        assert _copying(server) == 0  # no copy goes on in the server
    finally:
        blocker.close()
    assert _databases(server) == [server.dbname, pristine]  # no clone, marked or not
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.ready, status
    assert record_files(record_path(server)) == [".lock", "record"]


def test_a_helpers_copy_made_as_the_refill_stops_is_not_marked(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the helpers were halted only once the main thread had cancelled its own copy and dropped it; a
    # helper whose CREATE DATABASE ended meanwhile found no halt and marked its clone, a ready clone of a refill
    # recorded as stopped.
    server = _two_to_copy(root, monkeypatch, "marking")
    marker = tmp_path / "marking.at"
    helper = tmp_path / "marking.at.helper"
    stopped = _stopped_at("marking", server, [], tmp_path, at=lambda: marker.exists() and helper.exists())
    assert stopped == 128 + signal.SIGTERM
    assert _databases(server) == [server.dbname, pristine_name(server.dbname)]  # its copy dropped, not marked
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.ready, status


def test_a_refill_stopped_while_its_server_does_not_answer_ends_at_once(root: Path, tmp_path: Path) -> None:
    # Before: the stop was held across the running note's connect (as across the note's write), so a refill whose
    # server did not answer ended only once that connect timed out (10 s; 120 s here, past the 60 s of the wait).
    server = LocalEngine(root / "state").start("unanswered")
    with psycopg.connect(server.dsn("postgres")) as conn:
        postmaster = psutil.Process(conn.info.backend_pid).ppid()
    os.kill(postmaster, signal.SIGSTOP)  # the kernel takes connections; nothing answers them
    try:
        assert _stopped_at("connecting", server, ["--no-fill"], tmp_path) == 128 + signal.SIGTERM
    finally:
        os.kill(postmaster, signal.SIGCONT)
    status = pool_status(server)
    assert (status.failed, status.refilling, status.bodies) == ("", "", ""), status
    assert record_files(record_path(server)) == []  # no note, no part: it never reached the server
