"""Faults a production queue meets, through real Redis, real workers and a real embedded Postgres: a worker
started before any run, a consumer group deleted by hand, a target database dropped before the run's features,
a worker paused past the visibility timeout, runs pruned and deleted under a working worker.
Row counts are checked in Postgres exactly: nothing lost, nothing loaded twice."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from refresher.jobs import worker as worker_module
from refresher.jobs.queue import DEAD, FEATURES_DUE, GROUP, RETRY, TIERS, run_key, stream_key, text
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.child_processes import outputs
from tests.redis_server import RedisServer
from tests.refresher.jobs.killed_worker import STEPS
from tests.refresher.jobs.test_worker import (
    SYMBOLS,
    ledger,
    run_burst,
    start_worker,
    status,
    stop,
    submit,
    wait_for,
    wait_started,
    worker_log,
    worker_logs,
    workspace,
)
from tests.refresher.test_refresh_e2e import AS_OF, Workspace, expected_rows

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared with test_worker


def assert_loaded_exactly(ws: Workspace, symbols: list[str], months: int) -> None:
    """Every segment of ``symbols`` in the ledger, each table holding exactly the rows the calendar says, and
    the ledger's row counts matching the tables: no segment lost, no row loaded twice."""
    first = AS_OF.year * 12 + AS_OF.month - months  # the window's first month, counted from year 0
    start = dt.date(first // 12, first % 12 + 1, 1)
    daily, minute = expected_rows(len(symbols), start, AS_OF)
    names = ", ".join(f"'{s}'" for s in symbols)
    assert ws.scalar(f"SELECT count(*) FROM ohlcv_daily WHERE symbol IN ({names})") == daily
    assert ws.scalar(f"SELECT count(*) FROM ohlcv_1min WHERE symbol IN ({names})") == minute
    segments = {seg: rows for seg, (_hash, rows) in ledger(ws).items() if seg.split("/")[0] in symbols}
    assert len(segments) == len(symbols) * months * 2
    assert sum(segments.values()) == daily + minute


def test_a_worker_started_before_any_run_and_a_group_deleted_mid_run_lose_nothing(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    # On an empty Redis the streams and their group do not exist yet: XAUTOCLAIM said NOGROUP, the worker's
    # thread died with a traceback and the process exited 0, running nothing.
    early = start_worker(ws, url, "early")
    try:
        time.sleep(2)
        assert early.poll() is None, worker_log(ws, "early")
        run = submit(ws, url)
        wait_for(ws, url, run["run_id"], lambda s: s["done"] >= 2)
        # An operator deletes the group by hand, pending entries and all; the worker makes it again.
        redis_server.client().xgroup_destroy(stream_key("normal"), GROUP)
        final = wait_for(ws, url, run["run_id"], lambda s: s["state"] == "complete")
        assert early.poll() is None, worker_log(ws, "early")
    finally:
        stop([early])
    assert early.returncode == 0 and "Traceback" not in worker_log(ws, "early"), worker_log(ws, "early")
    assert final["done"] == final["total"] == run["jobs"] and final["dead"] == 0
    assert_loaded_exactly(ws, SYMBOLS, 3)


def test_features_failing_on_a_dropped_database_end_the_run_incomplete_and_the_worker_lives(
    workspace: Workspace, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, url = workspace, redis_server.url
    run = submit(ws, url)["run_id"]
    dsn = ws.dsn()
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    real = worker_module.run_features

    def dropped_first(*args: Any, **kwargs: Any) -> Any:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "run_features", dropped_first)
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions("drop", burst=True, visibility_timeout=2, backoff_base=0.01, backoff_cap=0.05)
    report = Worker(url, settings, options).run()  # --burst: returns once nothing is left to try

    state = status(ws, url, run)
    assert (report.done, report.features) == (state["total"], 0)
    assert state["state"] == "incomplete" and state["done"] == state["total"] and state["dead"] == 0
    assert dbname in state["error"] and state["error"].startswith("features: ")
    client = redis_server.client()
    assert not client.sismember(FEATURES_DUE, run)
    # The dropped session's error is transient; the reconnect then meets a database that does not exist, which
    # is refused (3D000), so not retried up to max_attempts.
    assert int(client.hget(run_key(run), "features_attempts") or 0) == 2
    assert state["error"].startswith("features: permanent: target ") and "does not exist" in state["error"]
    human = ws.run("jobs", "status", run, "--queue", url).stdout
    assert "incomplete" in human and dbname in human
    ws.run("jobs", "status", run, "--watch", "--queue", url, expect=1)

    # retry-dead makes its features due again, with fresh attempts.
    ws.run("jobs", "retry-dead", run, "--queue", url)
    state = status(ws, url, run)
    assert (state["state"], state["error"]) == ("loaded", None) and client.sismember(FEATURES_DUE, run)


def kill_after(ws: Workspace, url: str, step: str) -> None:
    """A worker killed with SIGKILL right after ``step`` of its first job (``killed_worker``)."""
    args = ws.command("worker", "--queue", url, "--name", f"dies-{step}", "--visibility-timeout", "1")
    killed = subprocess.run(
        [sys.executable, "-m", "tests.refresher.jobs.killed_worker", step, *args[3:]],
        env=ws.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)


def test_a_worker_killed_after_any_step_of_a_job_loses_nothing_and_loads_nothing_twice(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """SIGKILL right after each step (claim, in-flight mark, store write, COPY, commit, ack, features,
    snapshot); a second worker finishes the run: every row there once, the run counted once, complete."""

    ws, url = workspace, redis_server.url
    for step in STEPS:
        symbols = [f"{step[:3].upper()}A", f"{step[:3].upper()}B"]
        ws.write_profile(symbols=symbols, months=2)
        run = submit(ws, url)
        assert run["jobs"] == 8, step
        kill_after(ws, url, step)
        run_burst(ws, url, f"after-{step}", "--visibility-timeout", "1")
        assert "Traceback" not in worker_log(ws, f"after-{step}"), step
        final = status(ws, url, run["run_id"])
        assert (final["state"], final["done"], final["dead"]) == ("complete", 8, 0), (step, final)
        assert_loaded_exactly(ws, symbols, 2)
        names = ", ".join(f"'{s}'" for s in symbols)
        daily = ws.scalar(f"SELECT count(*) FROM ohlcv_daily WHERE symbol IN ({names})")
        assert ws.scalar(f"SELECT count(*) FROM features_dashboard_data WHERE symbol IN ({names})") == daily


def test_a_run_deleted_by_hand_mid_run_leaves_the_worker_running_the_next(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url, client = workspace, redis_server.url, redis_server.client()
    symbols = [*SYMBOLS, "IBM", "XOM", "CVX", "JPM", "BAC", "WMT", "HD", "DIS"]
    ws.write_profile(symbols=symbols, months=3)
    gone = submit(ws, url)["run_id"]
    worker = start_worker(ws, url, "w")

    def alive() -> None:
        assert worker.poll() is None, worker_log(ws, "w")  # its thread died on the finish script's Lua error

    try:
        deadline = time.monotonic() + 300
        while int(client.hget(run_key(gone), "done") or 0) < 2:
            alive()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client.delete(run_key(gone))  # an operator cleaning up old runs, too early
        run = submit(ws, url)  # plans again: what the deleted run had not loaded
        final = wait_for(ws, url, run["run_id"], lambda s: alive() or s["state"] == "complete")
        time.sleep(1)
        alive()
    finally:
        stop([worker])
    assert worker.returncode == 0 and "Traceback" not in worker_log(ws, "w"), worker_log(ws, "w")
    assert final["done"] == final["total"] == run["jobs"] > 0
    listed = ws.run("jobs", "list", "--queue", url, "--json").stdout
    assert [r["run_id"] for r in json.loads(listed)["runs"]] == [run["run_id"]]
    ws.run("jobs", "status", gone, "--queue", url, expect=2)
    assert_loaded_exactly(ws, symbols, 3)


def not_lost_until_complete(state: dict[str, Any]) -> bool:
    assert state["lost"] == 0, state
    return bool(state["state"] == "complete")


def test_two_submitters_at_once_and_redis_killed_mid_run_load_every_row_once(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """Two `jobs submit` of one profile at the same moment make two runs of the same segments; Redis is killed
    with SIGKILL mid-run (AOF everysec: up to a second of writes lost) and restarted. Both runs complete, and
    each row is in Postgres once."""
    ws, url = workspace, redis_server.url
    args = ws.command("jobs", "submit", "--profile", ws.profile, "--queue", url, "--json")
    submitters = [subprocess.Popen(args, env=ws.env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    runs = [json.loads(out) for out, _err in outputs(submitters, timeout=600)]
    assert [p.returncode for p in submitters] == [0, 0]
    assert runs[0]["run_id"] != runs[1]["run_id"] and runs[0]["jobs"] == runs[1]["jobs"] == len(SYMBOLS) * 6
    workers = [start_worker(ws, url, f"w{i}") for i in range(2)]
    try:
        # Both running, not one still starting: a worker whose start meets no Redis exits 2 (wait_started).
        wait_started(ws, redis_server, workers)
        wait_for(ws, url, runs[0]["run_id"], lambda s: s["done"] >= 3)
        assert redis_server.process is not None
        redis_server.process.kill()  # no AOF flush: the last second of writes may be gone
        redis_server.process.wait(timeout=30)
        redis_server.process = None
        time.sleep(1)
        redis_server.start()
        # Nothing reads lost after the restart: Redis keeps a prefix of its writes, counters and stream agree.
        finals = [wait_for(ws, url, r["run_id"], not_lost_until_complete) for r in runs]
    finally:
        stop(workers)
    assert [w.returncode for w in workers] == [0, 0], worker_logs(ws, workers)
    for final in finals:
        assert (final["done"], final["dead"]) == (final["total"], 0)
    assert_loaded_exactly(ws, SYMBOLS, 3)
    names = ", ".join(f"'{s}'" for s in SYMBOLS)
    daily = ws.scalar(f"SELECT count(*) FROM ohlcv_daily WHERE symbol IN ({names})")
    assert ws.scalar(f"SELECT count(*) FROM features_dashboard_data WHERE symbol IN ({names})") == daily


def _stacks(proc: subprocess.Popen[str], ws: Workspace, name: str) -> str:
    """The worker's log after it printed every thread's stack (SIGUSR1), or how it ended."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
    return f"{name} (exit {proc.poll()}):\n{worker_log(ws, name)}"


def stop_holding_no_lock(proc: subprocess.Popen[str]) -> None:
    """SIGSTOP ``proc`` at a moment it holds no file lock (all its threads stopped). Stopped inside one (the
    store's manifest lock, for the milliseconds of a read), it stalls every other process's next store write until
    it runs again: the kernel's flock has no lease, and that wait is not what these tests are about (three CI
    runs' live worker sat 120 s in its first batch's store write behind the stopped worker's shared lock)."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        while any(
            task.read_text().rsplit(")", 1)[1].split()[0] != "T"
            for task in Path(f"/proc/{proc.pid}/task").glob("*/stat")
        ):
            time.sleep(0.001)
        held = [  # flock and fcntl (DuckDB's) locks; a waiter's line reads "->" in the second field
            line.split() for line in Path("/proc/locks").read_text().splitlines() if line.split()[1] != "->"
        ]
        if not any(fields[4] == str(proc.pid) for fields in held):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)


def test_a_worker_paused_past_the_visibility_timeout_and_the_one_that_reclaimed_its_jobs_load_them_once(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url, client = workspace, redis_server.url, redis_server.client()
    run = submit(ws, url)
    paused = start_worker(ws, url, "paused")  # visibility timeout 3 s
    live = None
    try:
        deadline = time.monotonic() + 300
        while not client.hlen(run_key(run["run_id"], "inflight")):  # its first batch in hand
            assert paused.poll() is None and time.monotonic() < deadline, worker_log(ws, "paused")
            time.sleep(0.01)
        stop_holding_no_lock(paused)
        try:
            held = client.hgetall(run_key(run["run_id"], "inflight"))
            live = start_worker(ws, url, "live")
            # Past the 3 s timeout the live worker reclaims the paused one's jobs: taken over (started by the live
            # worker) or already finished by it; the paused one cannot have. Polled, not a fixed sleep: the live
            # worker's start (imports, its first connection) took over 8 s on a loaded 2-core machine.
            deadline = time.monotonic() + 120
            while True:
                now = client.hgetall(run_key(run["run_id"], "inflight"))
                taken = [mid for mid in held if now.get(mid) != held[mid]]
                if taken or time.monotonic() > deadline or live.poll() is not None:
                    break
                time.sleep(0.1)
            new = {mid: c for mid, c in now.items() if mid not in held}
            assert taken, f"held {len(held)}, now {len(now)}, new {new}\n{_stacks(live, ws, 'live')}"
        finally:
            paused.send_signal(signal.SIGCONT)  # both now on the same jobs; the segment lock orders them
        final = wait_for(ws, url, run["run_id"], lambda s: s["state"] == "complete")
        time.sleep(4)  # the paused worker settles what it held after the run completed
        assert paused.poll() is None and live.poll() is None
    finally:
        stop([paused, *([live] if live else [])])
    for name in ("paused", "live"):
        assert "Traceback" not in worker_log(ws, name), worker_log(ws, name)
    assert paused.returncode == 0 and live is not None and live.returncode == 0
    assert (final["done"], final["dead"], final["retrying"]) == (run["jobs"], 0, 0)
    again = wait_for(ws, url, run["run_id"], lambda s: True)
    assert (again["state"], again["done"], again["in_flight"], again["dead"]) == (
        "complete",
        run["jobs"],
        0,
        0,
    )
    assert sum(int(client.xpending(stream_key(t), GROUP)["pending"]) for t in TIERS) == 0
    assert_loaded_exactly(ws, SYMBOLS, 3)


def test_prune_and_a_forced_delete_while_a_worker_runs_leave_no_key_and_lose_no_row(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url, client = workspace, redis_server.url, redis_server.client()
    worker = start_worker(ws, url, "w")

    def alive() -> None:
        assert worker.poll() is None, worker_log(ws, "w")

    try:
        first = submit(ws, url)["run_id"]
        wait_for(ws, url, first, lambda s: alive() or s["state"] == "complete")
        symbols = [*SYMBOLS, "IBM", "XOM", "CVX", "JPM", "BAC", "WMT", "HD", "DIS"]
        ws.write_profile(symbols=symbols, months=3)
        second = submit(ws, url)["run_id"]
        wait_for(ws, url, second, lambda s: alive() or s["done"] >= 1)
        # Frozen mid-batch, its claimed jobs in hand (a long COPY, a GC pause), so the run is surely running.
        worker.send_signal(signal.SIGSTOP)
        try:
            state = status(ws, url, second)["state"]
            assert state in ("queued", "loaded")  # jobs out, or its features due
            pruned = json.loads(
                ws.run("jobs", "prune", "--older-than", "0s", "--queue", url, "--json").stdout
            )
            assert pruned["deleted"] == [first] and pruned["running"] == {second: state}, pruned
            refused = ws.run("jobs", "delete", second, "--queue", url, expect=2)
            assert "--force" in refused.stderr and refused.stderr.count("\n") == 1
            ws.run("jobs", "delete", second, "--force", "--queue", url)
        finally:
            worker.send_signal(signal.SIGCONT)
        time.sleep(3)  # the worker settles what it held: acknowledged only
        alive()
        third = submit(ws, url)  # plans again: what the deleted run had not loaded
        final = wait_for(ws, url, third["run_id"], lambda s: alive() or s["state"] == "complete")
    finally:
        stop([worker])
    assert worker.returncode == 0 and "Traceback" not in worker_log(ws, "w"), worker_log(ws, "w")
    assert final["done"] == final["total"] == third["jobs"]
    left = {text(k).split(":")[2] for k in client.scan_iter("refresher:run:*")}
    assert left == {third["run_id"]}, left
    for tier in TIERS:
        assert client.xlen(stream_key(tier)) == 0
    assert client.xlen(DEAD) == 0 and client.zcard(RETRY) == 0
    ws.run("jobs", "status", first, "--queue", url, expect=2)
    ws.run("jobs", "status", second, "--queue", url, expect=2)
    assert_loaded_exactly(ws, symbols, 3)


def test_jobs_lost_with_their_stream_are_requeued_once_and_loaded_once(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    """The stream deleted by hand after one job was loaded and counted and another loaded but not acknowledged
    (its worker killed after the commit): `jobs status` counted the jobs lost, and nothing ever ran them.
    `jobs requeue` puts back exactly the lost ones (the loaded, uncounted one too: its rerun is a no-op by the
    ledger), a second requeue none; a worker then finishes the run with every row there once."""
    ws, url, client = workspace, redis_server.url, redis_server.client()
    symbols = ["LOSA", "LOSB"]
    ws.write_profile(symbols=symbols, months=2)
    run = submit(ws, url)["run_id"]
    kill_after(ws, url, "ack")  # one job loaded and counted; the worker took the batch, the rest pending
    kill_after(ws, url, "commit")  # another reclaimed, loaded, not acknowledged
    assert ws.scalar("SELECT count(*) FROM refresher_segments") == 2
    client.delete(stream_key("normal"))
    state = status(ws, url, run)
    assert (state["state"], state["done"], state["lost"]) == ("queued", 1, 7)

    requeued = json.loads(ws.run("jobs", "requeue", run, "--queue", url, "--json").stdout)
    assert requeued == {"run_id": run, "requeued": 7}
    assert status(ws, url, run)["lost"] == 0
    again = ws.run("jobs", "requeue", run, "--queue", url)
    assert again.stdout.strip() == f"{run}: 0 lost job(s) back on the queue"
    assert client.xlen(stream_key("normal")) == 7

    run_burst(ws, url, "requeued")
    final = status(ws, url, run)
    assert (final["state"], final["done"], final["dead"], final["lost"]) == ("complete", 8, 0, 0), final
    assert_loaded_exactly(ws, symbols, 2)


def test_a_worker_prints_every_threads_stack_on_sigusr1_and_goes_on(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    worker = start_worker(workspace, redis_server.url, "quiet")
    try:
        deadline = time.monotonic() + 120
        while not redis_server.client().exists(stream_key(TIERS[0])):  # its loop made the groups
            assert worker.poll() is None and time.monotonic() < deadline, worker_log(workspace, "quiet")
            time.sleep(0.1)
        worker.send_signal(signal.SIGUSR1)
        # Each thread's frames down to where it waits (in CI, the consumer thread's dump held only its innermost
        # frame, inside redis-py's read, so no caller's name can be counted on).
        while "most recent call first" not in worker_log(workspace, "quiet"):
            assert worker.poll() is None and time.monotonic() < deadline, worker_log(workspace, "quiet")
            time.sleep(0.1)
    finally:
        stop([worker])
    assert worker.returncode == 0, worker_log(workspace, "quiet")
    assert 'File "' in worker_log(workspace, "quiet")
