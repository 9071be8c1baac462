"""A detached refill whose server stops answering after it started (its postmaster stopped: the kernel takes
connections and nothing answers them; its host gone: no packet comes back), and one stopped while analyses wait
in its queue. Against real local servers and the refill's real ``main`` in a process of its own, held at a step
by a hook (``HOOK``, as ``test_pool_refill_stopped``'s ``HOOKED``): a stop is recorded without asking the server
again, a thread's connect to it is given up at once, a dead server (its port's packets dropped with iptables,
as root) ends the refill with its failure recorded instead of a wait for good, a stop cuts a thread's query whose
cancel the server does not take, and the analyses a stop drops are never begun, left recorded for the next
refill, while the one under way ends its work before the refill exits. A server that keeps its connections and
never answers them (a backend stopped, or the whole server: its kernel still answers TCP keepalives) is given up
on, said why; the cancels of a stop go out at once; the next refill ends the sessions a refill killed outright left
copying."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql

from refresher import pool
from refresher._planner_stats import record_pending
from refresher.engines.base import ServerInfo
from refresher.pool import _refill_notes, pool_status, refill_pool, unfinished_analyses
from refresher.snapshot import pristine_name
from tests.fixtures_postgres import refills_gone
from tests.refresher.test_pool_refill_failed import record_files, record_path
from tests.refresher.test_pool_refill_stopped import (
    HOOKED,
    _blocking_copies,
    _copying,
    _databases,
    _held_back,
    _sleeping,
    _stopped_at,
    _two_to_copy,
)
from tests.refresher.test_refresh_batches import root

pytestmark = pytest.mark.postgres

__all__ = ["root"]  # a fixture, imported to be found

# The refill's ``main`` with a hook at the step argv[1] that touches argv[2] (the marker), then, except
# "queued", waits (60 s at most) for argv[2] + ".go": "unanswered" at the refill's second connection (the first
# is its running note's), which it then opens with a 120 s timeout (the usual 10 s); "beside" as a thread beside
# the main one connects, the whole connect's timeout 120 s (``pool.CONNECT_TIMEOUT``); "silenced" as the pristine
# copy's analyzed copy is analyzed (made, connected to), its TCP keepalives and user timeout a few seconds
# (``pool.KEEPALIVES_IDLE``...); "queued" appends each handed-out database it analyzes to argv[2], and
# "ended:<name>" a second after that analysis ends, and holds the first one's analysis in the server
# (pg_sleep(300)); "stuck" probes its server every half second (``_refill_watch``: two probes unanswered give up);
# "cancels" copies three clones at once (``refill_concurrency`` 3) and appends "start <pid>" and "end <pid>" to
# argv[2] + ".log" around each cancel it sends (``cancel_safe``: psycopg's own, ``_Halt``'s); "late" has each probe
# unanswered (every 0.05 s, one gives up) and holds the watch's give-up, once it decided, until the clones' step
# returned and its count was kept (the watched block's body ended: no sleep), and the outcome's record until the
# give-up is sent. None of the last three waits.
HOOK = textwrap.dedent(
    """
    import contextlib, sys, threading, time
    from pathlib import Path
    import psycopg
    from refresher import _refill_watch, pool

    step, marker = sys.argv[1], Path(sys.argv[2])

    def held():
        marker.touch()
        go, deadline = Path(f"{marker}.go"), time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    if step == "unanswered":
        connect, made = psycopg.connect, []
        def connecting(*args, **kwargs):
            made.append(args)
            if len(made) == 2:
                held()
                kwargs["connect_timeout"] = 120
            return connect(*args, **kwargs)
        psycopg.connect = connecting
    elif step == "beside":
        connect, pool.CONNECT_TIMEOUT = psycopg.connect, 120
        def connecting(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                held()
                if kwargs.get("connect_timeout") == 10:  # a refill's whole timeout, before its slices
                    kwargs["connect_timeout"] = 120
            return connect(*args, **kwargs)
        psycopg.connect = connecting
    elif step == "silenced":
        pool.KEEPALIVES_IDLE, pool.KEEPALIVES_INTERVAL, pool.KEEPALIVES_COUNT = 1, 1, 2
        pool.TCP_USER_TIMEOUT = 2000
        analyze_stale = pool.analyze_stale
        def analyzing(conn, *args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                held()
            return analyze_stale(conn, *args, **kwargs)
        pool.analyze_stale = analyzing
    elif step == "queued":
        analyze_handed_out, wait_past_autovacuum, waits = pool._analyze_handed_out, pool.wait_past_autovacuum, []
        def analyzing(admin_dsn, handed, *args, **kwargs):
            with marker.open("a") as log:
                log.write(handed.name + "\\n")
            try:
                return analyze_handed_out(admin_dsn, handed, *args, **kwargs)
            finally:
                time.sleep(1)  # a thread's work that ends a moment after its query
                with marker.open("a") as log:
                    log.write(f"ended:{handed.name}\\n")
        def holding(conn):
            waits.append(conn)
            if len(waits) == 1:
                conn.execute("SELECT pg_sleep(300)")
            wait_past_autovacuum(conn)
        pool._analyze_handed_out, pool.wait_past_autovacuum = analyzing, holding
    elif step == "stuck":
        _refill_watch.WATCH_INTERVAL, _refill_watch.WATCH_TIMEOUT, _refill_watch.WATCH_MISSES = 0.5, 2, 2
    elif step == "cancels":
        pool.refill_concurrency = lambda cpus, rotational: 3
        cancel_safe = psycopg.Connection.cancel_safe
        def cancelling(self, *args, **kwargs):
            pid = self.info.backend_pid
            with open(f"{marker}.log", "a") as log:
                log.write(f"start {pid}\\n")
            try:
                return cancel_safe(self, *args, **kwargs)
            finally:
                with open(f"{marker}.log", "a") as log:
                    log.write(f"end {pid}\\n")
        psycopg.Connection.cancel_safe = cancelling
    elif step == "late":
        _refill_watch.WATCH_INTERVAL, _refill_watch.WATCH_MISSES = 0.05, 1
        _refill_watch._probe = lambda dsn, session, local, answer: answer.append("no answer (the test's)")
        refill, watching = pool._refill, _refill_watch.watching
        give_up, record_outcome = pool._STOPS.give_up, pool._record_outcome
        deciding, returned, sent = threading.Event(), threading.Event(), threading.Event()
        def filling(*args, **kwargs):
            created = refill(*args, **kwargs)
            deciding.wait(60)  # the watch found the block running, and gives up
            return created
        @contextlib.contextmanager
        def watched(*args, **kwargs):
            with watching(*args, **kwargs):
                yield
                returned.set()  # the clones' step returned, its count kept: the block ends now
        def giving_up(reason):
            deciding.set()
            returned.wait(60)
            give_up(reason)
            sent.set()
        def recording(*args, **kwargs):
            sent.wait(60)
            return record_outcome(*args, **kwargs)
        pool._refill, _refill_watch.watching = filling, watched
        pool._STOPS.give_up, pool._record_outcome = giving_up, recording
    sys.exit(pool.main(sys.argv[3:]))
    """
)


def _hooked(
    step: str,
    server: ServerInfo,
    args: list[str],
    tmp_path: Path,
    at: Callable[[], bool],
    signum: signal.Signals | None = signal.SIGTERM,
) -> int:
    """``_stopped_at`` with ``HOOK``; its exit code."""
    return _stopped_at(step, server, args, tmp_path, at, script=HOOK, signum=signum)


@contextmanager
def _postmaster_stopped(server: ServerInfo) -> Iterator[Callable[[], None]]:
    """A function that SIGSTOPs ``server``'s postmaster (new connections wait: the kernel takes them, nothing
    answers; the sessions open go on), SIGCONTed as the block ends."""
    with psycopg.connect(server.dsn("postgres")) as conn:
        postmaster = psutil.Process(conn.info.backend_pid).ppid()
    stopped: list[int] = []

    def stop() -> None:
        if not stopped:
            os.kill(postmaster, signal.SIGSTOP)
            stopped.append(postmaster)

    try:
        yield stop
    finally:
        if stopped:
            os.kill(postmaster, signal.SIGCONT)


def _connections_to(marker: Path, port: int) -> int:
    """How many TCP connections to ``port`` the hooked refill of ``marker`` (its argv[2]) has open."""
    [refill] = [child for child in psutil.Process().children() if str(marker) in child.cmdline()]
    return sum(1 for each in refill.net_connections("tcp") if each.raddr and each.raddr.port == port)


def _held_server(root: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> ServerInfo:
    """The server of profile ``name`` after a cold refresh whose refill was held back (``_held_back``)."""
    engine, _, _ = _held_back(root, monkeypatch, name)
    return engine.start(name)


def _released(
    marker: Path, act: Callable[[], None], ready: Callable[[], bool] | None = None
) -> Callable[[], bool]:
    """``_stopped_at``'s ``at`` for a ``HOOK`` step that waits: once the refill touched ``marker``, ``act`` (stop
    the postmaster, drop the port's packets; each once), the step let go (``<marker>.go``), then ``ready``."""

    def at() -> bool:
        if not marker.exists():
            return False
        act()
        Path(f"{marker}.go").touch()
        return ready is None or ready()

    return at


def _end_other_sessions(server: ServerInfo) -> None:
    """End every other client session of ``server``: a dead refill's, which the server never heard go (it waits for
    input), holding its advisory locks."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )


def _next_refill_sweeps(server: ServerInfo, ready: int, size: int | None = None) -> None:
    """Once the dead refill's sessions are ended, the next refill (``refill_pool``'s ``size``) drops what it left
    and makes ``ready`` clones: the server holds the working database, the pristine copy and those, nothing else."""
    _end_other_sessions(server)
    refill_pool(server, size=size)
    status = pool_status(server)
    assert len(status.ready) == ready, status
    assert sorted(_databases(server)) == sorted([server.dbname, pristine_name(server.dbname), *status.ready])


def test_a_refill_stopped_while_it_connects_to_a_server_that_stopped_answering_records_the_stop(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: each record asked the server where it goes, on a connection of its own (10 s timeout): the stop's
    # record waited 10 s on the stopped postmaster, failed, and nothing was recorded (status kept the last
    # outcome, as if no refill had run). Now the path learned as the refill started is used.
    server = _held_server(root, monkeypatch, "unanswered")
    marker = tmp_path / "unanswered.at"
    with _postmaster_stopped(server) as stop:
        connecting = _released(marker, stop, lambda: _connections_to(marker, server.port) == 1)  # unanswered
        assert _hooked("unanswered", server, [], tmp_path, connecting) == 128 + signal.SIGTERM
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.refilling, status
    assert record_files(record_path(server)) == [".lock", "record"]  # no note, no part
    assert _databases(server) == [server.dbname, pristine_name(server.dbname)]


def test_a_refill_stopped_while_a_thread_connects_to_a_server_that_stopped_answering_ends_at_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: a stop raised in the main thread alone, whose connect it ends; the thread analyzing a handed-out
    # database beside it went on connecting for its whole timeout (10 s; 120 s here, past the 60 s wait), and the
    # stopped refill waited for it. Now its connect, in slices, gives up at the next one.
    server = _held_server(root, monkeypatch, "beside")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("beside_h")))
        conn.execute(record_pending("beside_h", ["ohlcv_1min"]))
    marker = tmp_path / "beside.at"
    with _postmaster_stopped(server) as stop:
        # The main thread's connection, and the thread's, unanswered.
        connecting = _released(marker, stop, lambda: _connections_to(marker, server.port) == 2)
        assert _hooked("beside", server, ["--no-fill"], tmp_path, connecting) == 128 + signal.SIGTERM
    assert _refill_notes(record_path(server)) == []
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        assert unfinished_analyses(conn) == ["beside_h"]  # for the next refill


def _dropping(port: int) -> list[list[str]]:
    """iptables rules that drop every packet of loopback TCP port ``port``, either way: a host gone, as its
    clients see it (no answer, no reset), where the proxy of ``tests/tcp_proxy.py`` would still acknowledge."""
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", direction, str(port), "-j", "DROP"]
        for direction in ("--dport", "--sport")
    ]


@contextmanager
def _host_gone(port: int) -> Iterator[Callable[[], None]]:
    """A function that makes ``server``'s port drop every packet (``_dropping``), undone as the block ends;
    skips without root or iptables."""
    iptables = shutil.which("iptables")
    if os.geteuid() != 0 or iptables is None:
        pytest.skip("dropping a port's packets needs root and iptables")
    added: list[list[str]] = []

    def drop() -> None:
        if added:
            return
        for rule in _dropping(port):
            if subprocess.run([iptables, "-w", "-I", *rule], capture_output=True, check=False).returncode:
                pytest.skip(f"iptables refused {rule}")
            added.append(rule)

    try:
        yield drop
    finally:
        for rule in added:
            subprocess.run([iptables, "-w", "-D", *rule], capture_output=True, check=False)


def test_a_refill_whose_server_host_is_gone_mid_query_fails_and_records_it(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: no keepalive or user timeout on the refill's connections (the system's keepalive starts after 2 h):
    # its ANALYZE sent to a host that answered nothing more waited for good, and the refill with it (here past
    # the 60 s wait); the failure's record would then have waited on the server too.
    server = _held_server(root, monkeypatch, "silenced")
    with _host_gone(server.port) as drop:
        assert _hooked("silenced", server, [], tmp_path, _released(tmp_path / "silenced.at", drop), None) == 1
    status = pool_status(server)
    assert status.failed.startswith("the last refill (") and "stopped" not in status.failed, status
    assert not status.refilling and record_files(record_path(server)) == [".lock", "record"]
    # What it left (its analyzed copy, unmarked, in a private slot whose lock its session still holds in the
    # server) goes with the next refill's sweep, once that session ends.
    _next_refill_sweeps(server, ready=1, size=1)


def _copies_unanswered(server: ServerInfo, step: str, copies: int, tmp_path: Path, script: str) -> int:
    """Run the refill hooked at ``step`` (``script``: ``HOOK`` or ``HOOKED``) while each CREATE DATABASE waits
    (``_blocking_copies``), stop the postmaster once ``copies`` of them wait and SIGTERM the refill; its exit code."""
    blocker = _blocking_copies(server)
    try:
        with _postmaster_stopped(server) as stop:

            def copying() -> bool:
                if _copying(server) != copies:
                    return False
                stop()  # the test asks the server nothing more until it goes on
                return True

            return _stopped_at(step, server, [], tmp_path, copying, script=script)
    finally:
        blocker.close()


def test_a_refill_stopped_while_its_server_takes_no_cancel_cuts_its_helpers_copy_and_records_the_stop(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the helper thread's copy, its cancel not taken (the postmaster stopped), ran on (here: waited on the
    # lock below for good) and the refill waited for it; the main thread's closed connection (psycopg closes it
    # when its cancel is not taken) then raised "the connection is closed" over the stop as its locks were let
    # go, recorded as a failure.
    server = _two_to_copy(root, monkeypatch, "copying")
    assert _copies_unanswered(server, "copying", 2, tmp_path, HOOKED) == 128 + signal.SIGTERM
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed and not status.ready, status
    assert record_files(record_path(server)) == [".lock", "record"]
    # The copies the server went on with (it never heard their sessions go) are unmarked: never handed out, and
    # the next refill drops them.
    _next_refill_sweeps(server, ready=2)


def test_a_refill_stopped_with_analyses_queued_runs_none_of_them_and_the_next_refill_does(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before (``_Halt.threads`` without cancel_futures): the analysis under way was cancelled, then each queued one
    # ran before the refill exited.
    server = _held_server(root, monkeypatch, "queued")
    handed = [f"queued_h{n}" for n in range(3)]
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        for name in handed:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(pristine_name(server.dbname))
                )
            )
            conn.execute(record_pending(name, ["ohlcv_1min"]))
        assert sorted(unfinished_analyses(conn)) == handed
    log = tmp_path / "queued.at"

    def one_held() -> bool:
        return log.exists() and _sleeping(server) == 1

    assert _hooked("queued", server, ["--no-fill"], tmp_path, one_held) == 128 + signal.SIGTERM
    # The queued ones never began, and the held one's thread ended its work before the refill exited.
    lines = log.read_text().split()
    assert len(lines) == 2 and lines[1] == f"ended:{lines[0]}", lines
    deadline = time.monotonic() + 60
    while _sleeping(server):  # nor goes the held one on in the server
        assert time.monotonic() < deadline, "the held analysis still runs in the server"
        time.sleep(0.05)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        assert sorted(unfinished_analyses(conn)) == handed  # each still recorded, the cancelled one too
    assert _refill_notes(record_path(server)) == [] and ".part" not in record_files(record_path(server))
    # The next refill finishes them all.
    pool.spawn_refill(server, fill=False)
    refills_gone(server.dbname)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        assert unfinished_analyses(conn) == []  # cleared by each analysis as it ends


def _copier(server: ServerInfo) -> psutil.Process:
    """The server process of the one session of ``server`` in a CREATE DATABASE now."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        [(pid,)] = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query ILIKE 'CREATE DATABASE%%'"
        ).fetchall()
    return psutil.Process(pid)


@contextmanager
def _stopping() -> Iterator[list[psutil.Process]]:
    """A list to put processes in (the caller SIGSTOPs them), each SIGCONTed as the block ends."""
    stopped: list[psutil.Process] = []
    try:
        yield stopped
    finally:
        for each in stopped:
            each.resume()


def _refill_sessions(server: ServerInfo) -> int:
    """How many sessions of ``server`` a refill named (``pool._refill_main``)."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, 'refresher refill ')"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize(
    ("stopped", "args"),
    [("backend", ["--background"]), ("server", [])],
    ids=["its-backend-stopped", "the-whole-server-stopped"],
)
def test_a_refill_whose_server_stops_answering_mid_copy_gives_up_records_why_and_the_next_one_fills(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stopped: str, args: list[str]
) -> None:
    # Before: the clone's CREATE DATABASE sent to a backend that was then stopped waited for good (its kernel
    # answers the keepalives), and the refill with it: not ended 60 s later. Now a probe of the server from a
    # connection of its own (the whole server: no answer in its timeout; this host's backend: its process
    # stopped) gives up after a few unanswered ones, recorded as the refill's failure.
    server = _two_to_copy(root, monkeypatch, f"stuck_{stopped}")
    pool.resize_pool(server, 1)
    blocker = _blocking_copies(server)  # the copy waits in the server: one under way
    try:
        with _postmaster_stopped(server) as stop_postmaster, _stopping() as processes:

            def copying() -> bool:
                if _copying(server) != 1:
                    return False
                processes.append(_copier(server))
                processes[0].suspend()
                if stopped == "server":
                    stop_postmaster()  # the test asks it nothing more until it goes on
                return True

            assert _hooked("stuck", server, args, tmp_path, copying, None) == 1
    finally:
        blocker.close()
    status = pool_status(server)
    assert "gave up: the server did not answer for" in status.failed, status
    assert "before it filled the pool" in status.failed and not status.refilling, status
    assert record_files(record_path(server)) == [".lock", "record"]
    # Its copy's session, cancelled while it was stopped, ends once it goes on; the next refill then fills.
    deadline = time.monotonic() + 60
    while _refill_sessions(server):
        assert time.monotonic() < deadline, "the stopped copy's session never ended once it went on"
        time.sleep(0.05)
    pool.spawn_refill(server)
    refills_gone(server.dbname)
    status = pool_status(server)
    assert (len(status.ready), status.failed) == (1, ""), status
    assert sorted(_databases(server)) == sorted([server.dbname, pristine_name(server.dbname), *status.ready])


def test_a_refill_stopped_while_its_server_takes_no_cancel_sends_its_helpers_cancels_at_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: each helper's cancel went out after the previous one had waited out its 5 s (the postmaster stopped
    # takes none), then the analysis thread's: a stop took 5 s per session. Now they go out together.
    server = _two_to_copy(root, monkeypatch, "cancels")
    pool.resize_pool(server, 3)
    assert _copies_unanswered(server, "cancels", 3, tmp_path, HOOK) == 128 + signal.SIGTERM
    events = (tmp_path / "cancels.at.log").read_text().split("\n")[:-1]
    # psycopg's own cancel of the main thread's copy first, then the halt's, one per helper.
    main = events[0].split()[1]
    assert events[:2] == [f"start {main}", f"end {main}"], events
    helpers = events[2:]
    assert len(helpers) == 4 and [each.split()[0] for each in helpers[:2]] == ["start", "start"], events
    status = pool_status(server)
    assert "stopped by SIGTERM before it filled the pool" in status.failed, status


def test_the_next_refill_ends_the_sessions_a_killed_refill_left_copying(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: a refill killed outright (SIGKILL) left its copies' sessions in the server, which never heard it
    # go: each finished its copy, unmarked, holding its slot, until a later refill swept it. Now the next refill
    # ends them (their application_name, in the dead refill's note) before it sweeps.
    server = _two_to_copy(root, monkeypatch, "killed")
    blocker = _blocking_copies(server)
    try:

        def copying() -> bool:
            return _copying(server) == 2

        assert _stopped_at("copying", server, [], tmp_path, copying, signum=signal.SIGKILL) == -9
        [dead] = _refill_notes(record_path(server))
        assert dead.gone and dead.session, dead
        assert _copying(server) == 2  # the server goes on with them
        pool.spawn_refill(server, fill=False)  # a refill that only analyzes: it too ends them first
        refills_gone(server.dbname)
        assert _copying(server) == 0 and _refill_sessions(server) == 0
    finally:
        blocker.close()
    refill_pool(server)
    status = pool_status(server)
    assert len(status.ready) == 2, status
    assert sorted(_databases(server)) == sorted([server.dbname, pristine_name(server.dbname), *status.ready])
    assert dead.path.exists()  # status still says it died, until a refill records how the pool was left


def test_a_refill_whose_work_returned_as_its_watch_gave_up_is_not_recorded_as_given_up(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: the watch looked whether the block had ended, then gave up (a SIGTERM to the main thread): a refill
    # whose clones' step returned between the two was stopped after it, as it recorded its outcome, and exited 1
    # "gave up", its pool full. Now a give-up is decided and the block's end made one after the other, and one
    # that lands as the step returned is dropped: the refill records its outcome and exits 0.
    server = _two_to_copy(root, monkeypatch, "late")
    assert _hooked("late", server, [], tmp_path, lambda: True, None) == 0
    status = pool_status(server)
    assert (len(status.ready), status.failed) == (2, ""), status
