"""``jobs prune`` and ``jobs delete``: a finished run's keys all go in one step (hash, sets, index entries, dead
letters, its jobs left in a stream, waiting retries), a running one stays unless --force. Real redis-server."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import threading
from pathlib import Path

import psycopg
import pytest
import redis

from refresher.engines.base import ServerInfo
from refresher.errors import JobError
from refresher.fence import Fence
from refresher.jobs import runs as runs_module
from refresher.jobs import worker as worker_module
from refresher.jobs.queue import (
    DEAD,
    DELETING,
    FEATURES_DUE,
    FENCES_DUE,
    GROUP,
    RETRY,
    RUNS,
    TIERS,
    JobQueue,
    connect,
    features_fence_name,
    run_key,
    run_spec,
    stream_key,
    text,
)
from refresher.jobs.runs import (
    RunSpec,
    cancel_run,
    delete_run,
    delete_runs,
    list_runs,
    prune_runs,
    retry_dead,
    run_status,
    submit_jobs,
)
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.redis_server import RedisServer, free_port
from tests.refresher.jobs.test_cli_queue import one_line, refresher
from tests.refresher.jobs.test_queue import jobs, spec

pytestmark = pytest.mark.redis

DAY = 86400.0


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def keys_of(client: redis.Redis, run: str) -> list[str]:
    return sorted(text(k) for k in client.scan_iter(f"refresher:run:{run}*"))


def runs_in_streams(client: redis.Redis) -> set[str]:
    """The runs with an entry in a tier's stream, the dead letters or the retries."""
    found = set()
    for tier in TIERS:
        found |= {json.loads(f[b"job"])["run"] for _, f in client.xrange(stream_key(tier))}
    found |= {text(f[b"run"]) for _, f in client.xrange(DEAD)}
    found |= {json.loads(p)["run"] for p in client.zrange(RETRY, 0, -1)}
    return found


def pending(client: redis.Redis) -> int:
    return sum(int(client.xpending(stream_key(t), GROUP)["pending"]) for t in TIERS)


def _run_now(client: redis.Redis, prefix: str, count: int) -> str:
    """A normal run of ``count`` jobs (symbols ``prefix`` and a number) submitted now: its id."""
    return submit_jobs(client, spec("normal"), jobs(prefix, count), now=dt.datetime.now(dt.UTC)).run_id


def old_runs(client: redis.Redis) -> dict[str, str]:
    """Runs submitted ten days ago: one incomplete (two loaded, one dead), one cancelled with jobs left in its
    stream, one still running (a job pending, one waiting out a retry, one queued); and one finished today."""
    now = redis_now(client)
    then = dt.datetime.fromtimestamp(now - 10 * DAY, dt.UTC)
    queue = JobQueue(client)
    incomplete = submit_jobs(client, spec("high"), jobs("DEAD", 3), now=then).run_id
    for i, delivery in enumerate(queue.read("w", block_ms=0, count=3)):
        if i < 2:
            queue.finish(delivery, rows=5, loaded=True, now=then.timestamp())
        else:
            queue.dead_letter(delivery, "permanent: bad row", 3)
    recent = submit_jobs(client, spec("normal"), jobs("NEW", 1), now=then + dt.timedelta(days=10)).run_id
    [delivery] = queue.read("w", block_ms=0)
    queue.finish(delivery, rows=1, loaded=True, now=now)
    running = submit_jobs(client, spec("critical"), jobs("RUN", 3), now=then).run_id
    _first, second = queue.read("w", block_ms=0, count=2)
    queue.retry_later(second, due=now + 3600)  # the first stays pending, unacknowledged
    cancelled = submit_jobs(client, spec("low"), jobs("CANC", 4), now=then).run_id
    cancel_run(client, cancelled)
    states = {r: run_status(client, r).state for r in (incomplete, cancelled, running, recent)}
    assert list(states.values()) == ["incomplete", "cancelled", "queued", "loaded"]
    return {"incomplete": incomplete, "cancelled": cancelled, "running": running, "recent": recent}


def test_prune_removes_every_key_of_old_finished_runs_and_leaves_running_and_recent_ones(
    redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url)
    runs = old_runs(client)
    assert keys_of(client, runs["incomplete"]) and keys_of(client, runs["cancelled"])

    would = prune_runs(client, 7 * DAY, dry_run=True)
    assert sorted(would.deleted) == sorted([runs["incomplete"], runs["cancelled"]]) and would.dry_run
    assert keys_of(client, runs["incomplete"])  # a dry run removes nothing

    gone = prune_runs(client, 7 * DAY)
    assert sorted(gone.deleted) == sorted([runs["incomplete"], runs["cancelled"]])
    assert gone.running == {runs["running"]: "queued"}
    assert gone.entries == 1 + 4  # the dead letter, the cancelled run's four jobs left in its stream
    for name in ("incomplete", "cancelled"):
        assert keys_of(client, runs[name]) == [], name
        assert client.zscore(RUNS, runs[name]) is None
        with pytest.raises(JobError, match="no such run"):
            run_status(client, runs[name])
    assert runs_in_streams(client) == {runs["running"]}
    assert [r.run_id for r in list_runs(client)] == [runs["recent"], runs["running"]]
    assert run_status(client, runs["running"]).state == "queued"

    forced = prune_runs(client, 7 * DAY, force=True)
    assert forced.deleted == [runs["running"]] and forced.running == {}
    assert forced.entries == 3  # the pending job, the queued one, the retry
    assert keys_of(client, runs["running"]) == [] and runs_in_streams(client) == set()
    assert pending(client) == 0  # the pending entry was acknowledged, not left pointing at nothing
    assert [r.run_id for r in list_runs(client)] == [runs["recent"]]
    assert keys_of(client, runs["recent"])


def test_delete_refuses_a_running_run_unless_forced_and_a_worker_finishing_after_leaves_nothing(
    redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url)
    runs = old_runs(client)
    with pytest.raises(JobError, match="is queued"):
        delete_run(client, runs["running"])
    assert run_status(client, runs["running"]).state == "queued"
    queue = JobQueue(client)
    [late] = queue.read("late", block_ms=0)  # a worker takes the last job, then the run is deleted
    assert delete_run(client, runs["running"], force=True).deleted == [runs["running"]]
    queue.started(late, "late", redis_now(client))
    queue.finish(late, rows=1, loaded=True, now=redis_now(client))  # only acknowledged
    queue.complete(runs["running"], "{}", "", b"token")  # its features too: nothing made again
    assert keys_of(client, runs["running"]) == [] and pending(client) == 0
    with pytest.raises(JobError, match="no such run"):
        delete_run(client, runs["running"])


def test_delete_reads_the_queue_in_chunks_and_skips_a_payload_that_is_not_a_job(
    redis_server: RedisServer,
) -> None:
    # One script decoded every payload of every stream and retry: a payload that is not JSON (written by hand, a
    # tool's) failed the delete halfway, nothing rolled back; and it held Redis for the whole queue's length.
    client = connect(redis_server.url)
    queue = JobQueue(client)
    doomed, kept = _run_now(client, "GO", 7), _run_now(client, "STAY", 3)
    _first, second = queue.read("w", block_ms=0, count=2)
    queue.retry_later(second, due=redis_now(client) + 3600)  # the first stays pending
    client.xadd(stream_key("normal"), {"job": "not json"})
    client.zadd(RETRY, {"{not json either": 1.0})
    cancel_run(client, doomed)
    done = delete_runs(client, [doomed], chunk=2)
    assert done.deleted == [doomed] and done.entries == 7  # five left in the stream, the pending, the retry
    assert runs_in_streams_or_bad(client) == {kept, "?"}
    assert pending(client) == 0 and keys_of(client, doomed) == []
    assert client.zscore(RETRY, "{not json either") == 1.0 and run_status(client, kept).state == "queued"


def runs_in_streams_or_bad(client: redis.Redis) -> set[str]:
    """``runs_in_streams`` with '?' for a payload that is not a job's."""

    def run(raw: bytes) -> str:
        try:
            return str(json.loads(raw)["run"])
        except ValueError:
            return "?"

    found = {run(f[b"job"]) for tier in TIERS for _, f in client.xrange(stream_key(tier))}
    return found | {run(p) for p in client.zrange(RETRY, 0, -1)}


def test_prune_and_delete_through_the_cli(tmp_path: Path, redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    runs = old_runs(client)
    url = redis_server.url
    done = refresher(tmp_path, "jobs", "delete", runs["running"], "--queue", url)
    one_line(done, runs["running"], "queued", "--force")
    for bad in ("7", "7x", "-1d", "d"):
        done = refresher(tmp_path, "jobs", "prune", f"--older-than={bad}", "--queue", url)
        one_line(done, f"--older-than={bad!r}")
    assert keys_of(client, runs["incomplete"])
    done = refresher(tmp_path, "jobs", "prune", "--older-than", "7d", "--queue", url)
    assert done.returncode == 0, done.stderr
    assert "deleted 2 run(s)" in done.stdout and f"{runs['running']} (queued)" in done.stdout, done.stdout
    assert keys_of(client, runs["incomplete"]) == [] and keys_of(client, runs["cancelled"]) == []
    done = refresher(tmp_path, "jobs", "delete", runs["running"], "--force", "--queue", url, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["deleted"] == [runs["running"]], done.stderr
    assert runs_in_streams(client) == set()


def test_a_run_deleted_between_a_check_and_a_write_is_not_made_again(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cancel, retry-dead and a worker's failed features step checked the run, then wrote its hash: a delete in
    # between made the hash again without a spec (state, counters), a key `jobs prune` never finds.
    client = connect(redis_server.url)
    runs = old_runs(client)
    check = runs_module.require_run

    def deleted_after_the_check(client: redis.Redis, run_id: str) -> dict[str, object]:
        found = check(client, run_id)
        delete_run(client, run_id, force=True)
        return found

    monkeypatch.setattr(runs_module, "require_run", deleted_after_the_check)
    with contextlib.suppress(JobError):
        cancel_run(client, runs["cancelled"])
    monkeypatch.undo()
    assert keys_of(client, runs["cancelled"]) == [] or run_spec(client, runs["cancelled"]) is not None
    xrange = client.xrange

    def deleted_after_the_read(*args: object, **kwargs: object) -> object:  # retry-dead's read of the letters
        entries = xrange(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(client, "xrange", xrange)
        delete_run(client, runs["incomplete"], force=True)
        return entries

    monkeypatch.setattr(client, "xrange", deleted_after_the_read)
    assert retry_dead(client, runs["incomplete"]) == 0  # its dead letter went with it
    monkeypatch.undo()
    assert keys_of(client, runs["incomplete"]) == [] and runs["incomplete"] not in runs_in_streams(client)

    # A worker's features step failing on a run deleted meanwhile (before its count, here before the call).
    settings = Settings.from_env(
        {"REFRESHER_STATE_DIR": str(tmp_path / "state"), "FEATURE_STORE_PATH": str(tmp_path / "store")},
        engine="local",
    )
    worker = Worker(redis_server.url, settings, WorkerOptions("late"), client=client)
    checks = worker_module.__dict__.get("run_spec")
    if checks is not None:  # the check the worker made before its count: the delete comes after it
        monkeypatch.setattr(
            worker_module, "run_spec", lambda c, r: (checks(c, r), delete_run(c, r, force=True))[0]
        )
    else:
        delete_run(client, runs["running"], force=True)
    worker._features_failed(JobQueue(client), {}, runs["running"], RuntimeError("target gone"), b"token")
    assert keys_of(client, runs["running"]) == []
    assert not client.sismember(FEATURES_DUE, runs["running"])


def test_a_prune_killed_between_its_two_steps_is_finished_by_the_next(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`jobs prune` killed once the runs' keys are gone and before their dead letters and stream entries are:
    no later prune found them (the runs out of the index), so they stayed for good."""
    client = connect(redis_server.url)
    runs = old_runs(client)
    args = ("jobs", "prune", "--older-than", "7d", "--queue", redis_server.url)
    module = ("tests.refresher.jobs.killed_worker", "delete-keys")
    killed = refresher(tmp_path, *args, module=module)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = [runs["incomplete"], runs["cancelled"]]
    for run in finished:
        assert keys_of(client, run) == [] and client.zscore(RUNS, run) is None
    assert runs_in_streams(client) == {*finished, runs["running"]}  # killed between the two steps

    done = refresher(tmp_path, *args, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "deleted": [],
        "running": {runs["running"]: "queued"},
        "entries": 1 + 4,  # the dead letter, the cancelled run's four jobs
        "dry_run": False,
        "fences": 0,
        "fences_left": {},
    }
    assert runs_in_streams(client) == {runs["running"]}
    assert client.exists(DELETING) == 0
    assert run_status(client, runs["running"]).state == "queued"


def _fence_rows(target: str) -> set[str]:
    with psycopg.connect(target) as conn:
        return {fence for (fence,) in conn.execute("SELECT fence FROM refresher_fences")}


def _target_and_queue(
    pg_database: ServerInfo, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, redis.Redis]:
    """The test database's DSN as a run's target (its password from libpq's environment, as a worker's), and a
    client of the queue."""
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    return pg_database.dsn(with_password=False), connect(redis_server.url)


def _fenced_run(
    client: redis.Redis,
    where: str,
    when: dt.datetime,
    *,
    target: str,
    fenced: bool = True,
    finished: bool = True,
) -> str:
    """A run of one job into ``where``, its features step claiming the run's fence there (``fenced``; a row only
    when ``where`` is ``target``, the test's database), then complete (``finished``) or still queued (its job
    delivered, pending)."""
    queue = JobQueue(client)
    run_spec_ = RunSpec("p", "/nowhere/p.yaml", "2025-03-31", where, False, "normal")
    run = submit_jobs(client, run_spec_, jobs(f"F{when:%d}", 1), now=when).run_id
    [delivery] = queue.read("w", block_ms=0)
    assert delivery.job["run"] == run
    if finished:
        queue.finish(delivery, rows=1, loaded=True, now=when.timestamp())
    lock = client.lock(run_key(run, "features-lock"), timeout=60, thread_local=False)
    assert lock.acquire(blocking=False)
    if fenced:
        token = queue.features_fence(run, lock.local.token)
        if where == target:
            with psycopg.connect(target, autocommit=True) as conn:
                Fence(features_fence_name(run), token).claim(conn)
    if finished:
        assert queue.complete(run, "{}", "not this machine's server", lock.local.token)
    return run


def test_a_features_lock_taken_on_a_run_deleted_meanwhile_gets_no_fence_token(
    redis_server: RedisServer,
) -> None:
    # A worker's sweep read the run due, `jobs delete --force` removed it, then the worker took the run's features
    # lock (a key made anew): features_fence handed it a token and set the run's fence key again, left for good
    # (no delete comes again for a run gone), and its claim made a row in the target that nothing drops.
    client = connect(redis_server.url)
    queue = JobQueue(client)
    run = _run_now(client, "G", 1)
    assert delete_run(client, run, force=True).deleted == [run]
    lock = client.lock(run_key(run, "features-lock"), timeout=60, thread_local=False)
    assert lock.acquire(blocking=False)
    assert queue.features_fence(run, lock.local.token) == -1
    lock.release()
    assert keys_of(client, run) == []


@pytest.mark.postgres
def test_prune_and_delete_remove_the_fence_rows_of_the_runs_they_remove_and_only_those(
    redis_server: RedisServer, pg_database: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each run whose features step ran left a row of refresher_fences in its target, kept for good: a target
    # loaded by a run every few minutes for a year held a row for each.
    target, client = _target_and_queue(pg_database, redis_server, monkeypatch)
    closed = f"host=127.0.0.1 port={free_port()} user=u dbname=d"  # nothing listens there
    now = redis_now(client)
    then = dt.datetime.fromtimestamp(now - 10 * DAY, dt.UTC)

    def run_to(where: str, when: dt.datetime, *, fenced: bool = True, finished: bool = True) -> str:
        return _fenced_run(client, where, when, target=target, fenced=fenced, finished=finished)

    complete, complete_too = run_to(target, then), run_to(target, then)
    unfenced = run_to(target, then, fenced=False)
    recent = run_to(target, dt.datetime.fromtimestamp(now, dt.UTC))
    running = run_to(target, then, finished=False)
    everything = {features_fence_name(r) for r in (complete, complete_too, recent, running)}
    assert _fence_rows(target) == everything

    settings = Settings.from_env(
        {**os.environ, "REFRESHER_STATE_DIR": str(tmp_path / "state")}, engine="local"
    )
    gone = prune_runs(client, 7 * DAY, settings=settings)
    assert sorted(gone.deleted) == sorted([complete, complete_too, unfenced]) and running in gone.running
    assert (gone.fences, gone.fences_left) == (2, {})
    assert _fence_rows(target) == everything - {features_fence_name(r) for r in (complete, complete_too)}
    gone = delete_run(client, recent, settings=settings)
    assert (gone.deleted, gone.fences) == ([recent], 1)
    assert _fence_rows(target) == {features_fence_name(running)}

    # A target not reached: Redis is pruned all the same, and the output says which rows stayed where.
    elsewhere = run_to(closed, then)
    done = refresher(tmp_path, "jobs", "prune", "--older-than", "7d", "--queue", redis_server.url)
    assert done.returncode == 0, done.stderr
    assert f"deleted 1 run(s) (0 stream entries, dead letters and retries): {elsewhere}" in done.stdout
    assert (
        f"fence rows left in {closed} (refresher_fences), target not reached: 1 run(s) ({elsewhere}): "
        in (done.stderr)
    )
    assert "Traceback" not in done.stderr and keys_of(client, elsewhere) == []
    done = refresher(tmp_path, "jobs", "delete", running, "--force", "--queue", redis_server.url)
    assert done.returncode == 0, done.stderr
    assert "removed 1 fence row(s) of theirs from their targets" in done.stdout, done.stdout
    assert _fence_rows(target) == set()


@pytest.mark.postgres
def test_a_prune_behind_a_fence_row_locked_by_a_stopped_worker_leaves_it_within_the_bound(
    redis_server: RedisServer, pg_database: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # drop_fences' DELETE waited without bound for a row another transaction held: a worker stopped inside a
    # features write transaction holds its fence row FOR SHARE (Fence.check) until the server ends its session
    # (idle_in_transaction_session_timeout, 120 s), or for ever when stopped mid-statement; the prune hung as long.
    monkeypatch.setattr(runs_module, "FENCE_LOCK_WAIT", 0.5)
    target, client = _target_and_queue(pg_database, redis_server, monkeypatch)
    then = dt.datetime.fromtimestamp(redis_now(client) - 10 * DAY, dt.UTC)
    held, free = (_fenced_run(client, target, then, target=target) for _ in range(2))
    settings = Settings.from_env(
        {**os.environ, "REFRESHER_STATE_DIR": str(tmp_path / "state")}, engine="local"
    )
    answer: list[object] = []
    with psycopg.connect(target) as worker:  # the stopped worker's open transaction, past its check
        worker.execute(
            "SELECT token FROM refresher_fences WHERE fence = %s FOR SHARE", (features_fence_name(held),)
        )
        prune = threading.Thread(target=lambda: answer.append(prune_runs(client, 7 * DAY, settings=settings)))
        prune.start()
        # Ended with the row still locked: it did not wait for it (a bound on its time, 5 s, was a loaded
        # machine's to miss).
        prune.join(timeout=60)
        ended = not prune.is_alive()
        worker.rollback()  # lets a prune that hung end
    prune.join()
    assert ended, "the prune waited for the locked row"
    [gone] = answer
    assert isinstance(gone, runs_module.Deleted)
    assert sorted(gone.deleted) == sorted([held, free]) and keys_of(client, held) == []
    assert gone.fences == 0  # one DELETE a target: the unlocked row stays with the locked one
    assert list(gone.fences_left) == [target]
    assert "locked by another transaction for over 0.5 s" in gone.fences_left[target]
    assert "2 run(s) (" in gone.fences_left[target] and all(
        r in gone.fences_left[target] for r in (held, free)
    )
    assert _fence_rows(target) == {features_fence_name(held), features_fence_name(free)}


@pytest.mark.postgres
def test_a_prune_killed_before_it_reached_the_targets_leaves_their_fence_rows_to_the_next(
    redis_server: RedisServer, pg_database: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runs' targets were read from their specs before the runs' keys went, and their fence rows dropped after:
    # a prune killed in between (Ctrl-C, kill -9) left the rows for good, the specs gone with the keys.
    target, client = _target_and_queue(pg_database, redis_server, monkeypatch)
    then = dt.datetime.fromtimestamp(redis_now(client) - 10 * DAY, dt.UTC)
    fenced = [_fenced_run(client, target, then, target=target) for _ in range(2)]
    unfenced = _fenced_run(client, target, then, target=target, fenced=False)
    rows = {features_fence_name(r) for r in fenced}
    assert _fence_rows(target) == rows
    args = ("jobs", "prune", "--older-than", "7d", "--queue", redis_server.url)
    killed = refresher(tmp_path, *args, module=("tests.refresher.jobs.killed_worker", "delete-keys"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert all(keys_of(client, r) == [] for r in (*fenced, unfenced))
    assert _fence_rows(target) == rows  # killed before the target
    due = sorted(text(r) for r in client.hkeys(FENCES_DUE))
    assert due == sorted(fenced)  # the record the next prune reads

    done = refresher(tmp_path, *args, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["deleted"], answer["fences"], answer["fences_left"]) == ([], 2, {})
    assert _fence_rows(target) == set() and client.exists(FENCES_DUE) == 0
