"""The Redis side alone (real redis-server, no database): weighted priority reads, counting once, status."""

from __future__ import annotations

import datetime as dt

import pytest
import redis

from refresher.errors import JobError
from refresher.jobs.queue import DEAD, GROUP, Delivery, JobQueue, connect, stream_key, text
from refresher.jobs.runs import (
    RunSpec,
    Submitted,
    cancel_run,
    list_runs,
    retry_dead,
    run_status,
    submit_jobs,
)
from refresher.jobs.segment import SegmentJob
from refresher.segments import Segment
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

NOW = dt.datetime(2025, 7, 2, 20, 30, tzinfo=dt.UTC)


def jobs(symbol: str, n: int) -> list[SegmentJob]:
    months = [dt.date(2000 + i // 12, i % 12 + 1, 1) for i in range(n)]
    return [SegmentJob(Segment(symbol, "1d", m), f"seg-{symbol}-{m}", "America/New_York") for m in months]


def spec(priority: str) -> RunSpec:
    return RunSpec("p", "/nowhere/p.yaml", "2025-03-31", "host=db user=u dbname=d", False, priority)


def test_a_critical_run_submitted_behind_a_low_backlog_finishes_first_and_low_still_moves(
    redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url)
    low = submit_jobs(client, spec("low"), jobs("LOW", 40), now=NOW)
    critical = submit_jobs(client, spec("critical"), jobs("CRIT", 20), now=NOW)
    queue = JobQueue(client)
    low_done_when_critical_finished = None
    for _ in range(60):
        [delivery] = queue.read("w", block_ms=0)
        queue.finish(delivery, rows=1, loaded=True, now=NOW.timestamp())
        if low_done_when_critical_finished is None and run_status(client, critical.run_id).done == 20:
            low_done_when_critical_finished = run_status(client, low.run_id).done
    assert low_done_when_critical_finished is not None
    # 10:1 weights: about two low jobs ran while twenty critical ones did; low was not starved.
    assert 1 <= low_done_when_critical_finished <= 4
    assert run_status(client, low.run_id).done == 40
    assert queue.read("w", block_ms=0) == []
    weights = {t.tier: t.weight for t in run_status(client, low.run_id).tiers}
    assert weights == {"critical": 10, "high": 5, "normal": 2, "low": 1}


def test_a_job_delivered_twice_counts_once(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("normal"), jobs("AAA", 2), now=NOW)
    queue = JobQueue(client)
    [first] = queue.read("dies", block_ms=0)
    # "dies" never acknowledges; a live worker reclaims the job once it has been idle long enough.
    assert queue.reclaim("live", min_idle_ms=60_000) == []
    [(again, delivered)] = queue.reclaim("live", min_idle_ms=0)
    assert again.job == first.job and delivered == 2
    assert queue.finish(again, rows=10, loaded=True, now=NOW.timestamp()) is False
    assert queue.finish(first, rows=10, loaded=True, now=NOW.timestamp()) is False  # the late ack of "dies"
    state = run_status(client, run.run_id)
    assert (state.done, state.rows_loaded, state.pending) == (1, 10, 1)
    [second] = queue.read("live", block_ms=0)
    assert queue.finish(second, rows=5, loaded=True, now=NOW.timestamp()) is True  # the run's last
    assert run_status(client, run.run_id).state == "loaded"


def test_a_cancelled_run_reports_cancelled(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("high"), jobs("BBB", 3), now=NOW)
    assert cancel_run(client, run.run_id).state == "cancelled"
    queue = JobQueue(client)
    [delivery] = queue.read("w", block_ms=0)
    assert queue.started(delivery, "w", NOW.timestamp()) == "cancelled"


def test_status_of_120_000_jobs_reads_in_milliseconds_whatever_the_run_size(
    redis_server: RedisServer,
) -> None:
    client = connect(redis_server.url)
    many = [
        SegmentJob(Segment(f"S{i:04d}", tf, dt.date(2020 + m // 12, m % 12 + 1, 1)), f"k{i}{tf}{m}", "UTC")  # type: ignore[arg-type]
        for i in range(1000)
        for m in range(60)
        for tf in ("1d", "1m")
    ]
    run = submit_jobs(client, spec("normal"), many, now=NOW)
    assert run.jobs == 120_000 and client.xlen("refresher:jobs:normal") == 120_000
    state = run_status(client, run.run_id)
    assert state.total == state.pending == 120_000


def test_a_live_worker_extending_its_claim_keeps_its_job(redis_server: RedisServer) -> None:
    import time

    client = connect(redis_server.url)
    submit_jobs(client, spec("normal"), jobs("LONG", 1), now=NOW)
    queue = JobQueue(client)
    assert len(queue.read("slow", block_ms=0)) == 1
    time.sleep(1.0)
    assert len(queue.reclaim("other", min_idle_ms=900)) == 1  # silent for longer than the timeout: taken
    [(taken, _)] = queue.reclaim("slow", min_idle_ms=0)  # back to "slow" for the second half
    time.sleep(3.0)
    queue.extend([taken], "slow")  # the heartbeat of a worker still on the job
    # Silent 3 s but for the heartbeat: a bound of 2.9 s still takes a job nobody extended, and leaves a loaded
    # machine's pause between the heartbeat and the look that much room (with 900 ms, such a pause failed it).
    assert queue.reclaim("other", min_idle_ms=2900) == []


def two_deliveries(redis_server: RedisServer) -> tuple[redis.Redis, Submitted, JobQueue, Delivery, Delivery]:
    """A one-job run whose job a worker holds ("paused") and another reclaimed ("live")."""
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("normal"), jobs("AAA", 1), now=NOW)
    queue = JobQueue(client)
    [paused] = queue.read("paused", block_ms=0)
    [(again, _)] = queue.reclaim("live", min_idle_ms=0)
    return client, run, queue, paused, again


@pytest.mark.parametrize("late", ["dead", "retry"])
def test_a_late_failure_of_a_job_another_delivery_finished_only_acknowledges_it(
    redis_server: RedisServer, late: str
) -> None:
    # A worker paused past the visibility timeout fails (its connection died meanwhile) after the job it held was
    # reclaimed and loaded: counted dead, the loaded segment showed as dead, and retry-dead left the run queued
    # for good, its no-op rerun counting nothing.
    client, run, queue, paused, again = two_deliveries(redis_server)
    assert queue.finish(again, rows=10, loaded=True, now=NOW.timestamp()) is True
    if late == "dead":
        queue.dead_letter(paused, "permanent: connection lost", 3)
    else:
        queue.retry_later(paused, NOW.timestamp())
    state = run_status(client, run.run_id)
    assert (state.state, state.done, state.dead, state.retrying) == ("loaded", 1, 0, 0)
    assert client.xlen("refresher:dead") == 0 and client.zcard("refresher:retry") == 0
    assert retry_dead(client, run.run_id) == 0
    assert run_status(client, run.run_id).state == "loaded"


def test_two_deliveries_of_a_job_failing_at_the_same_attempt_wait_as_one_retry(
    redis_server: RedisServer,
) -> None:
    client, run, queue, paused, again = two_deliveries(redis_server)
    queue.retry_later(again, NOW.timestamp())
    queue.retry_later(paused, NOW.timestamp())
    assert run_status(client, run.run_id).retrying == 1  # was 2, and 1 for good after the promotion
    assert queue.promote_due(NOW.timestamp()) == 1
    assert run_status(client, run.run_id).retrying == 0
    [retried] = queue.read("live", block_ms=0)
    assert queue.finish(retried, rows=1, loaded=True, now=NOW.timestamp()) is True
    assert (run_status(client, run.run_id).state, run_status(client, run.run_id).retrying) == ("loaded", 0)


@pytest.mark.parametrize("dead_first", [True, False])
def test_a_run_whose_jobs_all_settled_with_dead_letters_is_incomplete_until_retried(
    redis_server: RedisServer, dead_first: bool
) -> None:
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("normal"), jobs("AAA", 2), now=NOW)
    queue = JobQueue(client)
    first, second = queue.read("w", block_ms=0, count=2)
    poison, fine = (first, second) if dead_first else (second, first)
    for delivery in (first, second):
        if delivery is poison:
            queue.dead_letter(poison, "permanent: bad row", 3)
        else:
            assert queue.finish(fine, rows=1, loaded=True, now=NOW.timestamp()) is False
    assert run_status(client, run.run_id).state == "incomplete"  # was 'queued' for good
    assert retry_dead(client, run.run_id) == 1
    assert run_status(client, run.run_id).state == "queued"
    [again] = queue.read("w", block_ms=0)
    assert queue.finish(again, rows=1, loaded=True, now=NOW.timestamp()) is True
    assert run_status(client, run.run_id).state == "loaded"


def test_the_jobs_of_a_run_deleted_by_hand_are_only_acknowledged(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("normal"), jobs("GONE", 4), now=NOW)
    queue = JobQueue(client)
    first, second, third, fourth = queue.read("w", block_ms=0, count=4)
    queue.retry_later(fourth, due=0)  # waiting out a backoff when the run goes
    client.delete(f"refresher:run:{run.run_id}")
    assert queue.started(first, "w", NOW.timestamp()) is None  # the worker drops it
    assert queue.finish(second, rows=5, loaded=True, now=NOW.timestamp()) is False  # was a Lua error
    queue.retry_later(third, due=0)
    queue.dead_letter(first, "boom", 1)
    assert queue.promote_due(NOW.timestamp()) == 1  # taken off the retry set, not queued again
    assert not client.exists(f"refresher:run:{run.run_id}")  # no counters left behind without a spec
    assert client.xlen("refresher:jobs:normal") == 0 and client.xlen("refresher:dead") == 0
    assert client.zcard("refresher:retry") == 0
    assert list_runs(client) == []  # its id is still in the index: `jobs list` failed on KeyError
    with pytest.raises(JobError, match="no such run"):
        run_status(client, run.run_id)


def test_stream_entries_that_are_not_jobs_are_set_aside_as_dead_letters_of_no_run(
    redis_server: RedisServer,
) -> None:
    # Read (XREADGROUP) or reclaimed (XAUTOCLAIM), such an entry raised in the worker (JSONDecodeError, KeyError)
    # and its thread died; pending, it was reclaimed by the next worker, which died the same way, and so on.
    client = connect(redis_server.url)
    stream = stream_key("normal")
    submit_jobs(client, spec("normal"), [], now=NOW)  # the streams and their group
    for fields in ({"job": "not json"}, {"payload": "no job field"}, {"job": '{"seg": "no run"}'}):
        client.xadd(stream, fields)  # type: ignore[arg-type]
    client.xreadgroup(GROUP, "died", {stream: ">"}, count=3)  # a worker that died holding them
    run = submit_jobs(client, spec("normal"), jobs("GOOD", 2), now=NOW).run_id
    client.xadd(stream, {"job": "[1, 2]"})
    said: list[str] = []
    queue = JobQueue(client, say=said.append)
    read = queue.read("w", block_ms=0, count=16)
    assert [(d.job["run"], d.job["seg"]) for d in read] == [(run, str(j.segment)) for j in jobs("GOOD", 2)]
    assert [queue.reclaim("w", 0) for _ in range(3)] == [
        [],
        [],
        [],
    ]  # each time the oldest pending: set aside
    letters = client.xrange(DEAD)
    assert len(letters) == len(said) == 4, said
    assert all(text(f[b"run"]) == "" and text(f[b"error"]).startswith("not a job: ") for _id, f in letters)
    assert client.xlen(stream) == 2 and client.xpending(stream, GROUP)["pending"] == 2  # the two jobs only
