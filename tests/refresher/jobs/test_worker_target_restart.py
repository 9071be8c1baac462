"""The target Postgres restarted under running workers: its jobs wait for it, no attempt spent, and the run
completes with every row once. Real redis-server, real worker processes, real embedded Postgres."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from refresher.engines import make_engine
from refresher.engines.local import Postmaster
from refresher.jobs.namespace import DEFAULT
from refresher.jobs.queue import DEAD, FEATURES_DUE, connect, run_key, text
from refresher.jobs.runs import RunSpec, retry_dead, run_status, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.jobs.target_down import CONNECT, found_down
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.segments import Segment
from refresher.settings import Settings
from tests.fixtures_postgres import found
from tests.redis_server import RedisServer, free_port
from tests.refresher.jobs.test_worker import start_worker, stop, submit, wait_for, worker_log, workspace
from tests.refresher.jobs.test_worker_faults import assert_loaded_exactly
from tests.refresher.test_refresh_e2e import AS_OF, Workspace

pytestmark = pytest.mark.redis

__all__ = ["workspace"]  # the fixture, shared with test_worker


def _pgdata(ws: Workspace) -> Path:
    """The data directory of the profile's running server. Found by ``found``, not ``Path.rglob``: the state dir
    is walked while the server's pool refill makes and drops databases (base/<oid> gone mid-walk)."""
    [pidfile] = found(ws.root / "state", "postmaster.pid")
    return pidfile.parent


@pytest.mark.postgres
@pytest.mark.slow
def test_a_target_restarted_mid_run_is_waited_for_and_the_run_completes(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    # Each job that met the server down spent an attempt: six attempts' backoffs (full jitter, from 0) add up to
    # seconds, and a restart of 15 s dead-lettered 15 of 96 jobs, the run `incomplete` until `jobs retry-dead`.
    # Three attempts here: a restart of seconds dead-lettered jobs at every run.
    ws, url = workspace, redis_server.url
    symbols = [f"T{i:02d}" for i in range(16)]
    ws.write_profile(symbols=symbols, months=3)
    run = submit(ws, url)
    engine = make_engine("local", Settings.from_env(ws.env, engine="local"))
    pgdata = _pgdata(ws)
    worker = start_worker(ws, url, "w", "--max-attempts", "3")
    try:
        wait_for(ws, url, run["run_id"], lambda s: s["done"] >= 10)
        postmaster = Postmaster.read(pgdata)
        assert postmaster is not None
        os.kill(postmaster.pid, signal.SIGINT)  # a fast shutdown: the worker's session ended mid-job
        while Postmaster.read(pgdata) is not None:
            time.sleep(0.05)
        time.sleep(8)  # down for a while: the worker meets it refusing connections
        engine.start(ws.profile)
        final = wait_for(
            ws,
            url,
            run["run_id"],
            lambda s: worker.poll() is None and s["state"] in ("complete", "incomplete"),
        )
    finally:
        stop([worker])
    log = worker_log(ws, "w")
    assert (final["state"], final["done"], final["dead"]) == ("complete", run["jobs"], 0), (final, log)
    assert "no attempt spent" in log and "Traceback" not in log, log
    assert_loaded_exactly(ws, symbols, 3)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_target_down_at_the_features_step_is_waited_for_and_the_run_completes(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """The segments loaded, the target stopped before the features step: each features attempt that met it down
    was counted, and with --max-attempts 2 the run read `incomplete` within a second of the step's first try. Now
    the step waits for the target as the run's jobs do (no attempt spent) and the run completes once it is up."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL", "MSFT"], months=1)
    run = submit(ws, url)
    client = connect(url)
    lock = run_key(run["run_id"], "features-lock")
    client.set(lock, "backoff", px=600_000)  # the features step waits while the segments load
    loader = start_worker(ws, url, "loader")
    try:
        wait_for(ws, url, run["run_id"], lambda s: s["state"] == "loaded" and s["done"] == run["jobs"])
    finally:
        stop([loader])
    engine = make_engine("local", Settings.from_env(ws.env, engine="local"))
    pgdata = _pgdata(ws)
    postmaster = Postmaster.read(pgdata)
    assert postmaster is not None
    os.kill(postmaster.pid, signal.SIGINT)
    while Postmaster.read(pgdata) is not None:
        time.sleep(0.05)
    client.delete(lock)
    worker = start_worker(ws, url, "w", "--max-attempts", "2")
    try:
        deadline = time.monotonic() + 300
        # Met down twice: the old worker had then spent both attempts, the run incomplete.
        while worker_log(ws, "w").count("no attempt spent") < 2 and client.sismember(
            FEATURES_DUE, run["run_id"]
        ):
            assert worker.poll() is None and time.monotonic() < deadline, worker_log(ws, "w")
            time.sleep(0.1)
        engine.start(ws.profile)
        final = wait_for(ws, url, run["run_id"], lambda s: s["state"] in ("complete", "incomplete"))
    finally:
        stop([worker])
    log = worker_log(ws, "w")
    assert final["state"] == "complete", (final, log)
    assert client.hget(run_key(run["run_id"]), "features_attempts") is None, log
    assert "features: target" in log and "no attempt spent" in log and "Traceback" not in log, log


def test_a_target_down_past_the_workers_wait_spends_attempts_and_is_dead_lettered(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens on the target's port (a wrong port, a server gone for good): waited for, no attempt spent,
    for ``target_down_wait``; then attempts count and the job ends dead-lettered, never a --burst worker that
    waits for ever."""
    ws = Workspace(tmp_path, "local", "gone")
    ws.write_profile(symbols=["AAPL"], months=1)
    target = f"host=127.0.0.1 port={free_port()} user=refresher dbname=gone"
    spec = RunSpec("gone", str(tmp_path / "profiles" / "gone.yaml"), AS_OF.isoformat(), target, False)
    job = SegmentJob(Segment("AAPL", "1d", AS_OF.replace(day=1)), "key-1d", "America/New_York")
    client = connect(redis_server.url)
    run = submit_jobs(client, spec, [job], now=dt.datetime.now(dt.UTC)).run_id
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions(
        "gone", burst=True, max_attempts=2, backoff_base=0.05, backoff_cap=0.2, target_down_wait=1.0
    )
    report = Worker(redis_server.url, settings, options).run()
    assert (report.dead, report.done) == (1, 0)
    assert run_status(client, run).dead == 1
    [(_id, letter)] = client.xrange(DEAD)
    assert text(letter[b"error"]).startswith(f"transient: target {target}: cannot connect"), letter
    assert text(letter[b"attempts"]) == "2"
    assert "no attempt spent" in capsys.readouterr().err  # waited first


def test_a_target_down_past_the_workers_wait_spends_the_features_attempts(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with nothing to load, its features due, and nothing listening on its target's port: waited for, no
    attempt spent, for ``target_down_wait``; then the features attempts count and the run ends incomplete, never a
    --burst worker that waits for ever."""
    ws = Workspace(tmp_path, "local", "gone")
    ws.write_profile(symbols=["AAPL"], months=1)
    target = f"host=127.0.0.1 port={free_port()} user=refresher dbname=gone"
    spec = RunSpec("gone", str(tmp_path / "profiles" / "gone.yaml"), AS_OF.isoformat(), target, False)
    client = connect(redis_server.url)
    run = submit_jobs(client, spec, [], now=dt.datetime.now(dt.UTC)).run_id
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions(
        "gone", burst=True, max_attempts=2, backoff_base=0.05, backoff_cap=0.2, target_down_wait=1.0
    )
    worker = Worker(redis_server.url, settings, options)
    for again in (False, True):
        if again:
            retry_dead(client, run)
        worker.run()
        state = client.hgetall(run_key(run))
        assert (state[b"state"], state[b"features_attempts"]) == (b"incomplete", b"2"), state
        error = text(state[b"error"])
        assert error.startswith(f"features: transient: target {target}: cannot connect"), state
        # Waited first, no attempt spent; after `jobs retry-dead` too, by the same worker: it judged the run's
        # target by the start of its first wait, over for a second, and spent both attempts at once.
        assert "features: target" in capsys.readouterr().err


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("at_once", [True, False], ids=["restarted", "down-a-while"])
def test_a_target_restarted_after_the_runs_last_job_is_waited_for_at_the_features_step(
    workspace: Workspace,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    at_once: bool,
) -> None:
    """The features step runs on the session its run's last job used, kept by the worker: a target restarted in
    between (up again at once, or still down when the worker connects again) failed its first statement, and that
    counted as a features attempt (with --max-attempts 1 the run read `incomplete`). Now a lost session is
    connected again once: the target down is waited for as a connection's failure is, and one answering again is
    tried after a short wait, neither spending an attempt. The target comes back at a point of the worker's, not
    after a sleep: "down a while" is down until the worker has said it found it so."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL", "MSFT"], months=1)
    run = submit(ws, url)["run_id"]
    settings = Settings.from_env(ws.env, engine="local")
    engine = make_engine("local", settings)
    pgdata = _pgdata(ws)
    stopped: list[int] = []
    started: list[str] = []
    features_locked, say = Worker._features_locked, Worker._say

    def start_once() -> None:
        if not started:
            started.append(ws.profile)
            engine.start(ws.profile)

    def restarted_first(worker: Worker, queue: Any, contexts: dict[str, Any], run_id: str, lock: Any) -> None:
        if not stopped:  # the first features step: on the session the run's last job used
            assert run_id in contexts
            postmaster = Postmaster.read(pgdata)
            assert postmaster is not None
            os.kill(postmaster.pid, signal.SIGINT)  # a fast shutdown: the kept session ends
            stopped.append(postmaster.pid)
            deadline = time.monotonic() + 120
            while Postmaster.read(pgdata) is not None:
                assert time.monotonic() < deadline, "the target's postmaster did not stop"
                time.sleep(0.05)
            if at_once:
                start_once()
        features_locked(worker, queue, contexts, run_id, lock)

    def saying(worker: Worker, message: str) -> None:
        say(worker, message)
        if "features: session to the target lost" in message:  # found down (or up again): start it now
            start_once()

    monkeypatch.setattr(Worker, "_features_locked", restarted_first)
    monkeypatch.setattr(Worker, "_say", saying)
    options = WorkerOptions("w", burst=True, max_attempts=1, backoff_base=0.2, backoff_cap=2.0)
    report = Worker(url, settings, options).run()
    err = capsys.readouterr().err
    state = connect(url).hgetall(run_key(run))
    assert (state[b"state"], report.features, report.dead) == (b"complete", 1, 0), (state, err)
    assert b"features_attempts" not in state, (state, err)
    assert "features: session to the target lost" in err and "no attempt spent" in err, err
    assert ("it answers again" if at_once else "cannot connect") in err, err


@pytest.mark.postgres
@pytest.mark.slow
def test_a_features_session_lost_after_jobs_retry_dead_is_waited_for_from_the_start(
    workspace: Workspace,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run whose features step lost its session to the target (waited for), then again past ``target_down_wait``
    (the attempt counted: --max-attempts 1, the run `incomplete`): the same worker, after `jobs retry-dead`, judged
    the next session lost by the start of the first wait, long over, and spent the fresh attempt at once (the run
    `incomplete` again while its target answered). Now it waits for it as for a first. Each session is ended by
    pg_terminate_backend (57P01, as a restart) just before the step runs on it."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    run = submit(ws, url)["run_id"]
    settings = Settings.from_env(ws.env, engine="local")
    down_wait = 2.0
    calls: list[float] = []  # when each features step ended, by time.monotonic()
    features_locked = Worker._features_locked

    def session_lost(worker: Worker, queue: Any, contexts: dict[str, Any], run_id: str, lock: Any) -> None:
        if len(calls) == 1:  # the second: past the wait begun at the first
            time.sleep(max(0.0, calls[0] + down_wait - time.monotonic()))
        if len(calls) < 3:
            ctx = worker._context(queue, contexts, run_id)
            with worker._servers.connect(ctx.spec, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s, 60000)", (ctx.conn.info.backend_pid,))
        try:
            features_locked(worker, queue, contexts, run_id, lock)
        finally:
            calls.append(time.monotonic())

    monkeypatch.setattr(Worker, "_features_locked", session_lost)
    options = WorkerOptions(
        "w", burst=True, max_attempts=1, backoff_base=0.05, backoff_cap=0.2, target_down_wait=down_wait
    )
    worker = Worker(url, settings, options)
    worker.run()
    client = connect(url)
    state = client.hgetall(run_key(run))
    err = capsys.readouterr().err
    assert (state[b"state"], len(calls)) == (b"incomplete", 2), (state, err)
    assert "no attempt spent" in err and "features failed after 1 attempt(s)" in err, err
    retry_dead(client, run)
    report = worker.run()
    state = client.hgetall(run_key(run))
    err = capsys.readouterr().err
    assert (state[b"state"], report.features, len(calls)) == (b"complete", 1, 4), (state, err)
    assert "features: session to the target lost" in err and "no attempt spent" in err, err


class DownTarget:
    """The workspace's Postgres stopped (a fast shutdown: its sessions end), and started again once, on demand."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.engine = make_engine("local", Settings.from_env(ws.env, engine="local"))
        self.started = False
        pgdata = _pgdata(ws)
        postmaster = Postmaster.read(pgdata)
        assert postmaster is not None
        os.kill(postmaster.pid, signal.SIGINT)
        deadline = time.monotonic() + 120
        while Postmaster.read(pgdata) is not None:
            assert time.monotonic() < deadline, "the target's postmaster did not stop"
            time.sleep(0.05)

    def start_once(self) -> None:
        if not self.started:
            self.started = True
            self.engine.start(self.ws.profile)


@pytest.mark.postgres
@pytest.mark.slow
def test_jobs_retry_dead_brought_back_with_the_target_still_down_are_waited_for_from_the_start(
    workspace: Workspace,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run's jobs dead-lettered once its target was down past ``target_down_wait``, then brought back by `jobs
    retry-dead` with the target still down: only a connection made ended a wait, so the worker judged them by the
    start of the one before, long over, and dead-lettered them again at once, unwaited (the run `incomplete` again,
    its target up a moment later). Now retry-dead starts the wait anew: the jobs wait, no attempt spent, and load
    once the target is up (started at the worker's first such line after retry-dead, not after a sleep)."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    submitted = submit(ws, url)
    run = submitted["run_id"]
    settings = Settings.from_env(ws.env, engine="local")
    target = DownTarget(ws)
    revived: list[bool] = []
    say = Worker._say

    def saying(worker: Worker, message: str) -> None:
        say(worker, message)
        if revived and "no attempt spent" in message:
            target.start_once()

    monkeypatch.setattr(Worker, "_say", saying)
    options = WorkerOptions(
        "w", burst=True, max_attempts=1, backoff_base=0.05, backoff_cap=0.2, target_down_wait=1.0
    )
    worker = Worker(url, settings, options)
    worker.run()
    client = connect(url)
    err = capsys.readouterr().err
    assert run_status(client, run).state == "incomplete", err
    assert "no attempt spent" in err and "dead-lettered after 1 attempt(s)" in err, err
    assert retry_dead(client, run) == submitted["jobs"]
    revived.append(True)
    worker.run()
    status, err = run_status(client, run), capsys.readouterr().err
    assert (status.state, status.done, status.dead) == ("complete", submitted["jobs"], 0), (status, err)
    assert "no attempt spent" in err and "dead-lettered" not in err, err


@pytest.mark.postgres
@pytest.mark.slow
def test_a_features_wait_another_worker_ended_does_not_judge_the_runs_next_features_step(
    workspace: Workspace,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Worker A found the run's target down at the features step and backed off; worker B took the step after the
    backoff and spent its last attempt (the run `incomplete`). A kept its wait, and its start, until it next
    touched the run: after `jobs retry-dead`, with the target still down, it judged the step by that start, long
    over, and spent the fresh attempt at once. Now whoever ends the step ends the waits for its target: A waits
    again, no attempt spent, and the run completes once the target is up (started at A's first such line after
    retry-dead)."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL"], months=1)
    run = submit(ws, url)["run_id"]
    settings = Settings.from_env(ws.env, engine="local")
    down: list[DownTarget] = []
    waited: list[float] = []  # when A said it waits, by time.monotonic()
    revived: list[bool] = []
    features_locked, say = Worker._features_locked, Worker._say

    def stopped_first(worker: Worker, queue: Any, contexts: dict[str, Any], run_id: str, lock: Any) -> None:
        if not down:  # A's first step, once the run's jobs loaded: the target stops, the step connects anew
            down.append(DownTarget(ws))
            contexts.pop(run_id).close()
        features_locked(worker, queue, contexts, run_id, lock)

    def saying(worker: Worker, message: str) -> None:
        say(worker, message)
        if worker.options.name == "a" and "features: target" in message and "no attempt spent" in message:
            if revived:
                down[0].start_once()
            else:
                waited.append(time.monotonic())
                worker.stop.set()  # A stops once it backed off

    monkeypatch.setattr(Worker, "_features_locked", stopped_first)
    monkeypatch.setattr(Worker, "_say", saying)
    a_wait = 1.0
    a = Worker(
        url,
        settings,
        WorkerOptions(
            "a", burst=True, max_attempts=1, backoff_base=0.05, backoff_cap=0.2, target_down_wait=a_wait
        ),
    )
    a.run()
    assert waited, capsys.readouterr().err
    b = Worker(
        url,
        settings,
        WorkerOptions(
            "b", burst=True, max_attempts=1, backoff_base=0.05, backoff_cap=0.2, target_down_wait=0.0
        ),
    )
    b.run()
    client = connect(url)
    err = capsys.readouterr().err
    assert run_status(client, run).state == "incomplete", err
    assert "refresher worker b: run" in err and "features failed after 1 attempt(s)" in err, err
    time.sleep(max(0.0, waited[0] + a_wait - time.monotonic()))  # A's wait, begun before its line, is over
    retry_dead(client, run)
    revived.append(True)
    a.stop.clear()
    a.run()
    state, err = client.hgetall(run_key(run)), capsys.readouterr().err
    assert (state[b"state"], a.report.features) == (b"complete", 1), (state, err)
    assert "features: target" in err and "no attempt spent" in err, err
    assert client.exists(run_key(run, "target-down")) == 0, client.hgetall(run_key(run, "target-down"))


@pytest.mark.postgres
@pytest.mark.slow
def test_a_finding_in_a_blip_another_worker_loaded_past_does_not_judge_a_later_restart(
    workspace: Workspace,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Another worker found the run's target down in a blip (``found_down``, as its worker does) while this one
    loaded the rest of the run on the session it kept: only a new connection ended the finding, so it stayed. Past
    ``target_down_wait`` the target restarts; this worker's session breaks (one attempt spent, as ever), and its next
    connection, refused, was judged down since the blip: its last attempt spent at once, the job dead-lettered, the
    run `incomplete`. Now a job loaded ends the finding: the restart is waited for, no attempt spent, and the run
    completes (the target started at the worker's first such line)."""
    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=["AAPL", "MSFT", "GOOG"], months=1)
    submitted = submit(ws, url)
    run = submitted["run_id"]
    assert submitted["jobs"] >= 3, submitted
    settings = Settings.from_env(ws.env, engine="local")
    down_wait = 1.0
    client = connect(url)
    settled: list[str] = []
    down: list[DownTarget] = []
    settle, say = Worker._settle, Worker._say

    def settling(worker: Worker, queue: Any, delivery: Any, contexts: dict[str, Any], action: Any) -> None:
        settle(worker, queue, delivery, contexts, action)
        settled.append(delivery.job["seg"])
        if len(settled) == 1:  # the blip, found by another worker; its wait over before this one loads again
            found_down(client, DEFAULT, run, CONNECT, forgotten_after=3600.0)
            time.sleep(down_wait * 1.5)
        elif len(settled) == 2:  # loaded on the kept session past the blip; now the restart
            down.append(DownTarget(ws))

    def saying(worker: Worker, message: str) -> None:
        say(worker, message)
        if down and "no attempt spent" in message:
            down[0].start_once()

    monkeypatch.setattr(Worker, "_settle", settling)
    monkeypatch.setattr(Worker, "_say", saying)
    options = WorkerOptions(
        "w",
        burst=True,
        batch=1,
        max_attempts=2,
        backoff_base=0.05,
        backoff_cap=60.0,  # the worker forgets a finding after 2 minutes: here the job loaded ends it
        target_down_wait=down_wait,
    )
    try:
        Worker(url, settings, options).run()
    finally:
        if down:
            down[0].start_once()
    status, err = run_status(client, run), capsys.readouterr().err
    assert down, err
    assert (status.state, status.done, status.dead) == ("complete", submitted["jobs"], 0), (status, err)
    assert "no attempt spent" in err and "dead-lettered" not in err, err
