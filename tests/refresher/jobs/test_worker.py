"""Segment jobs through a real Redis, real worker processes and a real embedded Postgres."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from refresher._snapshot_sql import TAKE
from refresher.jobs.queue import JobQueue, connect
from refresher.jobs.worker import parse_segment
from refresher.pool import wait_for_pool
from tests.child_processes import reap
from tests.fixtures_postgres import world_traversable_tmp
from tests.redis_server import RedisServer
from tests.refresher.test_refresh_e2e import Workspace
from tests.refresher.test_snapshot_adversarial import _refusing
from tests.refresher.test_snapshot_crash import _killed_after

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

SYMBOLS = ["AAPL", "MSFT", "KO", "PEP"]


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    root = world_traversable_tmp("refresher-jobs-")
    ws = Workspace(root, "local", f"jobs_{uuid.uuid4().hex[:8]}")
    ws.write_profile(symbols=SYMBOLS, months=3)
    try:
        yield ws
    finally:
        ws.down()


def submit(ws: Workspace, redis_url: str, *extra: str, profile: str | None = None) -> dict[str, Any]:
    done = ws.run(
        "jobs", "submit", "--profile", profile or ws.profile, "--queue", redis_url, "--json", *extra
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def status(ws: Workspace, redis_url: str, run_id: str) -> dict[str, Any]:
    done = ws.run("jobs", "status", run_id, "--queue", redis_url, "--json")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def start_worker(ws: Workspace, redis_url: str, name: str, *extra: str) -> subprocess.Popen[str]:
    args = ["worker", "--queue", redis_url, "--name", name, "--visibility-timeout", "3", *extra]
    with (ws.root / f"worker-{name}.log").open("w") as log:
        return subprocess.Popen(
            ws.command(*args), env=ws.env, stdout=log, stderr=subprocess.STDOUT, text=True
        )


def run_burst(ws: Workspace, redis_url: str, name: str, *extra: str, timeout: float = 600) -> None:
    """A --burst worker, waited for until it exits 0 (its log the failure's message). One still running at
    ``timeout`` is killed: left behind, it ran on into later tests, and its Popen, collected unwaited, raised a
    ResourceWarning there (an innocent test's failure under filterwarnings = error)."""
    worker = start_worker(ws, redis_url, name, "--burst", *extra)
    try:
        assert worker.wait(timeout=timeout) == 0, worker_log(ws, name)
    finally:
        reap(worker)


def worker_log(ws: Workspace, name: str) -> str:
    return (ws.root / f"worker-{name}.log").read_text()


def wait_started(ws: Workspace, redis_server: RedisServer, workers: list[subprocess.Popen[str]]) -> None:
    """Wait until each of ``workers`` (named w0, w1, ...) holds a connection to ``redis_server``: past its start.
    A test that restarts Redis under running workers waits for this first: its run's ``done`` says that one worker
    runs, not all. In a loaded xdist run one worker's start (its imports, seconds on a busy machine) outlasted the
    other's first jobs, met the killed Redis and exited 2 (reproduced by holding a worker's start until the kill:
    exit 2, 'cannot reach Redis', the run completed by the other); a worker now waits for Redis at its start too
    (--connect-timeout), but a test that means both workers to meet the restart mid-run still waits here."""
    deadline = time.monotonic() + 300
    for i, proc in enumerate(workers):
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, f"w{i}: {worker_log(ws, f'w{i}')}"
            try:
                if any(
                    c.raddr and c.raddr.port == redis_server.port
                    for c in psutil.Process(proc.pid).net_connections()
                ):
                    break
            except psutil.Error:  # it ended meanwhile: the assertion above says how
                pass
            time.sleep(0.05)


def worker_logs(ws: Workspace, workers: list[subprocess.Popen[str]]) -> str:
    """Each worker's exit status and log (named w0, w1, ...), for an assertion on how they ended."""
    return "\n".join(f"w{i} (exit {w.returncode}):\n{worker_log(ws, f'w{i}')}" for i, w in enumerate(workers))


def wait_at_door(
    conn: psycopg.Connection[Any],
    appname: str,
    proc: subprocess.Popen[str],
    describe: Callable[[], str],
    timeout: float = 300,
) -> None:
    """Wait until the session named ``appname`` waits on an advisory lock (a door's TAKE), ``proc`` alive;
    ``describe`` says what it did when it exits or the wait times out."""
    waiting = "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event = 'advisory'"
    deadline = time.monotonic() + timeout
    while conn.execute(waiting, (appname,)).fetchone() is None:
        assert proc.poll() is None and time.monotonic() < deadline, describe()
        time.sleep(0.05)


def wait_for(
    ws: Workspace, redis_url: str, run_id: str, predicate: Any, timeout: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(ws, redis_url, run_id)
        if predicate(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} never got there: {state}")


def stop(workers: list[subprocess.Popen[str]]) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        for proc in workers:
            proc.wait(timeout=120)
    finally:  # one that did not stop: killed, the others still waited for
        reap(*workers)


def ledger(ws: Workspace, profile: str | None = None) -> dict[str, tuple[str, int]]:
    with psycopg.connect(ws.dsn(profile)) as conn:
        rows = conn.execute(
            "SELECT symbol || '/' || timeframe || '/' || to_char(month, 'YYYY-MM'), content_hash, rows "
            "FROM refresher_segments"
        )
        return {seg: (h, n) for seg, h, n in rows}


def test_three_workers_one_killed_load_exactly_what_an_in_process_refresh_does(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    run = submit(ws, url)
    assert run["jobs"] == len(SYMBOLS) * 3 * 2
    secret = psycopg.conninfo.conninfo_to_dict(ws.dsn()).get("password")
    workers = [start_worker(ws, url, f"w{i}") for i in range(3)]
    try:
        wait_for(ws, url, run["run_id"], lambda s: s["done"] >= 3)
        workers[0].send_signal(signal.SIGKILL)  # mid-run, maybe mid-COPY: its transaction rolls back
        final = wait_for(ws, url, run["run_id"], lambda s: s["state"] == "complete")
    finally:
        stop(workers)
    assert [w.returncode for w in workers[1:]] == [0, 0]
    assert final["done"] == final["total"] == run["jobs"] and final["dead"] == 0
    assert final["features"]["desired"] == len(SYMBOLS)
    # Secrets never travel through Redis.
    client = redis_server.client()
    assert secret
    dump = b"".join(
        repr(client.dump(key)).encode() for key in client.scan_iter("refresher:*") if client.dump(key)
    )
    assert secret.encode() not in dump

    reference = ws.write_profile(f"{ws.profile}_ref", symbols=SYMBOLS, months=3)
    ws.refresh(profile=reference)
    assert ws.checksums() == ws.checksums(reference)
    assert set(ledger(ws).values()) == set(ledger(ws, reference).values())
    count = "SELECT count(*) FROM features_dashboard_data"
    assert ws.scalar(count) == ws.scalar(count, reference) > 0


def test_a_job_committed_but_never_acknowledged_is_redone_as_a_no_op(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """A worker that commits and dies before XACK: the job is redelivered and changes nothing."""
    from featurestore import FeatureStore
    from refresher.jobs.segment import SegmentJob, run_segment_job
    from refresher.plan import segment_key
    from refresher.profile import load_profile
    from refresher.sources import make_source

    ws, url = workspace, redis_server.url
    run = submit(ws, url)
    queue = JobQueue(connect(url))
    [delivery] = queue.read("doomed", block_ms=0)
    segment = parse_segment(delivery.job["seg"])
    profile = load_profile(ws.profile, [ws.root / "profiles"], as_of=dt_of(ws))
    source = make_source(profile)
    store = FeatureStore(ws.root / "store")
    key = segment_key(segment, source.kind, source.version(segment))
    with psycopg.connect(ws.dsn(), autocommit=True) as conn:
        first = run_segment_job(SegmentJob(segment, key, delivery.job["tz"]), source, store, conn)
    assert first.loaded and first.rows_loaded > 0  # committed; "doomed" dies here, before acknowledging

    run_burst(ws, url, "survivor")
    final = status(ws, url, run["run_id"])
    assert final["done"] == final["total"] == run["jobs"]
    assert final["state"] == "complete"
    # The redelivered job loaded nothing: rows equal the ledger, and the run counted its rows once.
    table = "ohlcv_daily" if segment.timeframe == "1d" else "ohlcv_1min"
    assert ledger(ws)[str(segment)][1] == first.rows_loaded
    assert final["segments_loaded"] == run["jobs"] - 1
    assert ws.scalar(f"SELECT count(*) FROM {table} WHERE symbol = '{segment.symbol}'") > 0
    assert ws.scalar("SELECT sum(rows) FROM refresher_segments") == (
        ws.scalar("SELECT count(*) FROM ohlcv_daily") + ws.scalar("SELECT count(*) FROM ohlcv_1min")
    )


def dt_of(ws: Workspace) -> Any:
    from tests.refresher.test_refresh_e2e import AS_OF

    return AS_OF


def test_redis_restarted_mid_run_the_run_completes(workspace: Workspace, redis_server: RedisServer) -> None:
    ws, url = workspace, redis_server.url
    run = submit(ws, url)
    workers = [start_worker(ws, url, f"w{i}") for i in range(2)]
    try:
        wait_started(ws, redis_server, workers)
        wait_for(ws, url, run["run_id"], lambda s: s["done"] >= 2)
        redis_server.stop()
        time.sleep(2)  # workers see connection refused and back off
        redis_server.start()  # the AOF brings back streams, groups, pending entries and counters
        final = wait_for(ws, url, run["run_id"], lambda s: s["state"] == "complete")
    finally:
        stop(workers)
    assert [w.returncode for w in workers] == [0, 0], worker_logs(ws, workers)
    assert final["done"] == final["total"] == run["jobs"]
    assert len(ledger(ws)) == run["jobs"]
    assert ws.scalar("SELECT sum(rows) FROM refresher_segments") == (
        ws.scalar("SELECT count(*) FROM ohlcv_daily") + ws.scalar("SELECT count(*) FROM ohlcv_1min")
    )


def test_bad_queue_url_is_one_line_and_exit_2(workspace: Workspace) -> None:
    done = workspace.run("jobs", "status", "nope", "--queue", "redis://127.0.0.1:1/0", expect=2)
    assert done.stderr.count("\n") == 1 and "--queue=redis://127.0.0.1:1/0" in done.stderr
    assert "Traceback" not in done.stderr


def daily_csv(symbol: str, *, bad_day: str | None = None) -> str:
    lines = ["symbol,date,open,high,low,close,volume"]
    day = dt.date(2024, 10, 1)
    while day <= dt.date(2024, 11, 29):
        if day.weekday() < 5:
            close = "-5" if day.isoformat() == bad_day else "10.5"
            lines.append(f"{symbol},{day},10,11,9,{close},1000")
        day += dt.timedelta(days=1)
    return "\n".join(lines) + "\n"


FILES_PROFILE = """\
universe: {{symbols: [AAPL, MSFT, KO]}}
start: 2024-10-01
end: 2024-11-29
timeframes: [1d]
source:
  kind: files
  path: {path}
  daily: 'daily/{{symbol}}.csv'
"""


def test_a_poison_job_is_dead_lettered_the_others_complete_and_retry_dead_finishes_the_run(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    data = ws.root / "data" / "daily"
    data.mkdir(parents=True)
    for symbol in ("AAPL", "MSFT"):
        (data / f"{symbol}.csv").write_text(daily_csv(symbol))
    (data / "KO.csv").write_text(daily_csv("KO", bad_day="2024-10-15"))  # a negative close in October
    (ws.root / "profiles" / f"{ws.profile}.yaml").write_text(FILES_PROFILE.format(path=ws.root / "data"))
    run = submit(ws, url)
    assert run["jobs"] == 6

    run_burst(ws, url, "w1")
    state = status(ws, url, run["run_id"])
    # every job settled, one dead: 'queued' before, and `jobs status --watch` never returned
    assert (state["done"], state["dead"], state["state"]) == (5, 1, "incomplete")
    ws.run("jobs", "status", run["run_id"], "--watch", "--queue", url, expect=1)
    [(_, entry)] = redis_server.client().xrange("refresher:dead")
    assert json.loads(entry[b"job"])["seg"] == "KO/1d/2024-10"
    assert entry[b"attempts"] == b"3" and b"permanent" in entry[b"error"] and b"close" in entry[b"error"]
    assert "KO/1d/2024-10" not in ledger(ws)
    said = [line for line in worker_log(ws, "w1").splitlines() if "KO/1d/2024-10" in line]
    assert (
        len(said) == 3 and "dead-lettered after 3 attempt(s): permanent" in said[-1]
    )  # one line per attempt

    (data / "KO.csv").write_text(daily_csv("KO"))  # the source is fixed
    requeued = json.loads(ws.run("jobs", "retry-dead", run["run_id"], "--queue", url, "--json").stdout)
    assert requeued["requeued"] == 1
    run_burst(ws, url, "w2")
    state = status(ws, url, run["run_id"])
    assert (state["done"], state["dead"], state["state"]) == (6, 0, "complete")
    assert len(ledger(ws)) == 6


def test_when_closed_holds_the_run_while_the_exchange_trades_and_releases_it_after_the_close(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    open_now, after_close = "2025-07-02T11:00:00-04:00", "2025-07-02T16:01:00-04:00"
    run = submit(ws, url, "--when-closed", "xnys", "--now", open_now)
    assert run["held_until"] == "2025-07-02 16:00 America/New_York"
    human = ws.run("jobs", "status", run["run_id"], "--queue", url).stdout
    assert "held until 2025-07-02 16:00 America/New_York" in " ".join(human.split())

    run_burst(ws, url, "early", "--now", "2025-07-02T15:59:00-04:00", timeout=300)
    state = status(ws, url, run["run_id"])
    assert (state["state"], state["done"], state["held"]) == ("held", 0, run["jobs"])
    assert not ledger(ws)

    run_burst(ws, url, "late", "--now", after_close)
    state = status(ws, url, run["run_id"])
    assert (state["state"], state["done"], state["held"]) == ("complete", run["jobs"], 0)


def test_bad_submissions_are_one_line_exit_2_and_enqueue_nothing(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    closed = f"host=127.0.0.1 port={redis_server.port + 1 if redis_server.port < 65535 else 1} "
    cases = [
        (["--target", closed + "user=x password=hunter2 dbname=x connect_timeout=3"], "--target="),
        (["--target", "this is = not a dsn ="], "--target"),
        (["--when-closed", "NOPE"], "NOPE"),
        (["--priority", "urgent"], "urgent"),
    ]
    for extra, named in cases:
        done = ws.run("jobs", "submit", "--profile", ws.profile, "--queue", url, *extra, expect=2)
        assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    done = ws.run("worker", "--queue", url, "--concurrency", "0", expect=2)
    assert done.stderr.count("\n") == 1 and "--concurrency=0" in done.stderr
    assert redis_server.client().zcard("refresher:runs") == 0


def test_sigterm_finishes_the_job_in_hand_hands_back_the_rest_and_exits_0(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    from refresher.jobs.runs import run_status

    ws, url = workspace, redis_server.url
    ws.write_profile(symbols=[*SYMBOLS, "IBM", "XOM", "CVX", "JPM", "BAC", "WMT", "HD", "DIS"], months=3)
    run = submit(ws, url)
    client = connect(url)
    # A long visibility timeout: jobs left pending by the stopping worker would stay stuck for ten minutes.
    worker = start_worker(ws, url, "stopping", "--visibility-timeout", "600")
    try:
        deadline = time.monotonic() + 300
        while run_status(client, run["run_id"]).done < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=300) == 0, worker_log(ws, "stopping")
    finally:
        reap(worker)
    state = status(ws, url, run["run_id"])
    assert state["in_flight"] == 0 and 1 <= state["done"] < state["total"]
    assert state["done"] < 16  # the worker's first read took 16 jobs; those it had not started went back
    assert redis_server.client().xpending("refresher:jobs:normal", "workers")["pending"] == 0
    run_burst(ws, url, "finisher", "--visibility-timeout", "600")
    assert status(ws, url, run["run_id"])["state"] == "complete"
    assert len(ledger(ws)) == run["jobs"]


@pytest.mark.parametrize("command", ["worker", "plan", "submit"])
def test_a_reset_killed_with_its_door_shut_leaves_a_database_workers_plan_and_submit_open(
    workspace: Workspace, request: pytest.FixtureRequest, command: str
) -> None:
    """A reset killed between its last read of the ledger and its swap leaves the database refusing sessions; reset,
    status and refresh opened it, but a worker retried until its jobs went dead, and plan and submit failed."""
    ws = workspace
    ws.write_profile(symbols=["AAPL"], months=1)
    ws.refresh()
    wait_for_pool(ws.server(), timeout=300)  # the refresh's refill is done: the reset has the server alone
    url = "" if command == "plan" else request.getfixturevalue("redis_server").url
    if command == "worker":
        ws.write_profile(symbols=["AAPL"], months=2)  # February too: jobs for the worker
        run = submit(ws, url)
        assert run["jobs"] == 2
    server = ws.server()
    assert not _killed_after(server, 1, "snapshot.restore_pristine(server, refill=False)")  # ALTER DATABASE
    assert _refusing(server)
    if command == "worker":
        done = ws.run("worker", "--queue", url, "--name", "door", "--burst", "--max-attempts", "2")
        state = status(ws, url, run["run_id"])
        assert (state["state"], state["done"], state["dead"]) == ("complete", 2, 0), done.stderr
        assert len(ledger(ws)) == 4
    elif command == "plan":
        assert json.loads(ws.run("plan", "--profile", ws.profile, "--json").stdout)["server_running"]
    else:
        assert submit(ws, url)["jobs"] == 0
    assert not _refusing(server)


def test_plan_leaves_shut_the_door_a_live_reset_holds_and_connects_after_its_swap(
    workspace: Workspace,
) -> None:
    """Only a dead reset's door is opened: a live one (TAKE held, the door shut, as from its last read of the ledger
    to its swap) is waited for, and the door stays shut until that reset opens it."""
    ws = workspace
    ws.write_profile(symbols=["AAPL"], months=1)
    ws.refresh()
    server = ws.server()
    wait_for_pool(server, timeout=300)  # the refresh's refill is done: the plan alone waits for TAKE
    door = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as reset:
        reset.execute("SELECT pg_advisory_lock(hashtext(%s), %s)", (server.dbname, TAKE))
        reset.execute(door.format(sql.Identifier(server.dbname), sql.SQL("false")))
        plan = subprocess.Popen(
            ws.command("plan", "--profile", ws.profile, "--json"),
            env={**ws.env, "PGAPPNAME": "door-plan"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_at_door(reset, "door-plan", plan, lambda: str(plan.communicate()))
            assert _refusing(server)  # the plan waits for the reset, its door shut
            reset.execute(door.format(sql.Identifier(server.dbname), sql.SQL("true")))
            reset.execute("SELECT pg_advisory_unlock(hashtext(%s), %s)", (server.dbname, TAKE))
            out, err = plan.communicate(timeout=300)
        finally:
            reap(plan)
    assert plan.returncode == 0, err
    assert json.loads(out)["server_running"]
