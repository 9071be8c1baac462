"""A stream trimmed or deleted by hand loses its jobs: ``jobs status`` says how many in one line and ``jobs status
--watch`` ends with exit status 2 rather than waiting for good. Real redis-server."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from refresher.errors import JobError
from refresher.jobs import runs
from refresher.jobs.queue import JobQueue, connect, stream_key
from refresher.jobs.runs import list_runs, run_status, submit_jobs
from tests.child_processes import reap
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_cli_queue import one_line, refresher, start_refresher
from tests.refresher.jobs.test_queue import jobs, spec

pytestmark = pytest.mark.redis


def test_jobs_lost_with_their_stream_are_reported_and_watch_ends_with_status_2(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("LOST", 5), now=now).run_id
    queue = JobQueue(client)
    [first, second] = queue.read("w", block_ms=0, count=2)
    queue.finish(first, rows=1, loaded=True, now=now.timestamp())  # one done, one in a worker's hands
    state = run_status(client, run)
    assert (state.lost, state.pending) == (0, 4)
    client.xtrim(
        stream_key("normal"), maxlen=2, approximate=False
    )  # an operator trims: two of the four left remain
    assert run_status(client, run).lost == 2
    client.delete(stream_key("normal"))  # and then deletes it
    state = run_status(client, run)
    assert (state.state, state.lost, state.pending) == ("queued", 4, 0)

    human = refresher(tmp_path, "jobs", "status", run, "--queue", redis_server.url)
    assert human.returncode == 0, human.stderr
    assert "4 job(s) lost" in human.stdout.splitlines()[0], human.stdout
    as_json = refresher(tmp_path, "jobs", "status", run, "--queue", redis_server.url, "--json")
    assert json.loads(as_json.stdout)["lost"] == 4
    # It waited for ever: nothing would ever run those jobs.
    watched = refresher(tmp_path, "jobs", "status", run, "--watch", "--queue", redis_server.url)
    one_line(watched, run, "4 job(s) lost", f"jobs requeue {run}")
    queue.finish(second, rows=1, loaded=True, now=now.timestamp())  # the worker's job still counts
    assert run_status(client, run).lost == 3


def test_a_run_being_submitted_or_held_is_not_lost(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    held = submit_jobs(client, spec("normal"), jobs("HELD", 3), now=now, held_until_ts=now.timestamp() + 3600)
    assert run_status(client, held.run_id).lost == 0
    run = submit_jobs(client, spec("low"), jobs("SUB", 3), now=now).run_id
    client.set(f"refresher:run:{run}:submitting", 1, ex=60)  # as while its jobs are being added
    client.delete(stream_key("low"))
    assert run_status(client, run).lost == 0


def test_a_submit_killed_midway_shows_its_missing_jobs_lost_once_it_stops_enqueueing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or kill -9) of `jobs submit` after its first chunk of jobs: the run counts five, the stream holds
    two. It read 'queued, 3 pending' for good, and `--watch` waited for ever."""
    client = connect(redis_server.url)
    real = runs.enqueue

    def interrupted(client: redis.Redis, tier: str, payloads: list[str], **kwargs: Any) -> list[float]:
        real(client, tier, payloads[:2], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "enqueue", interrupted)
    # 3 s, not 1: a loaded machine's pause of a second between the submit and the first look saw the key gone.
    monkeypatch.setattr(runs, "SUBMITTING_TTL", 3, raising=False)
    with pytest.raises(KeyboardInterrupt):
        submit_jobs(client, spec("normal"), jobs("HALF", 5), now=dt.datetime.now(dt.UTC))
    [run] = [r.run_id for r in list_runs(client)]
    assert run_status(client, run).lost == 0  # the submitter might still be adding them
    deadline = time.monotonic() + 60
    while client.exists(f"refresher:run:{run}:submitting") and time.monotonic() < deadline:  # it expires
        time.sleep(0.05)
    state = run_status(client, run)
    assert (state.state, state.lost, state.pending) == ("queued", 3, 2)


def test_requeue_puts_back_exactly_the_lost_jobs_once(redis_server: RedisServer) -> None:
    """Ten jobs: one done, one dead, one waiting out a retry, one in a worker's hands, six queued; the stream
    trimmed to its last two entries. Requeue adds the four lost (not the done, dead, retrying, in-flight or
    remaining ones), again adds none."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    other = submit_jobs(client, spec("normal"), jobs("OTHER", 2), now=now).run_id
    run = submit_jobs(client, spec("normal"), jobs("TRIM", 10), now=now).run_id
    queue = JobQueue(client)
    [_o1, _o2, done, dead, retrying, in_hand] = queue.read("w", block_ms=0, count=6)
    queue.finish(done, rows=1, loaded=True, now=now.timestamp())
    queue.dead_letter(dead, "permanent: bad row", 3)
    queue.retry_later(retrying, due=now.timestamp() + 3600)
    client.xtrim(stream_key("normal"), maxlen=2, approximate=False)  # in_hand and the oldest four queued go
    assert run_status(client, run).lost == 5

    assert runs.requeue_lost(client, run) == 5  # in_hand too: its entry is gone with the stream's
    assert runs.requeue_lost(client, run) == 0
    state = run_status(client, run)
    assert (state.lost, state.done, state.dead, state.retrying, state.pending) == (0, 1, 1, 1, 7)
    segments = [json.loads(f[b"job"])["seg"] for _id, f in client.xrange(stream_key("normal"))]
    assert sorted(segments) == sorted(str(j.segment) for j in jobs("TRIM", 10)[3:])  # each once
    assert in_hand.job["seg"] in segments and done.job["seg"] not in segments
    # The other run's two jobs, in a worker's hands, went with the trim too: `jobs status` misses them (a lower
    # bound: the stream holds the first run's jobs), requeue finds them.
    assert run_status(client, other).lost == 0 and runs.requeue_lost(client, other) == 2


def test_requeue_refuses_a_run_still_submitting_or_without_its_job_list(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("low"), jobs("SUB", 3), now=now).run_id
    client.set(f"refresher:run:{run}:submitting", 1, ex=60)
    with pytest.raises(JobError, match="still being submitted"):
        runs.requeue_lost(client, run)
    client.delete(f"refresher:run:{run}:submitting", f"refresher:run:{run}:jobs")  # as before requeue existed
    with pytest.raises(JobError, match="without its job list"):
        runs.requeue_lost(client, run)
    held = submit_jobs(client, spec("normal"), jobs("HELD", 3), now=now, held_until_ts=now.timestamp() + 3600)
    assert runs.requeue_lost(client, held.run_id) == 0
    with pytest.raises(JobError, match="no such run"):
        runs.requeue_lost(client, "nope")


def test_a_second_requeue_or_retry_dead_meanwhile_adds_nothing_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's requeue and a cron job's at once: the second ran its reads between the first's and its adds,
    and both put the four lost jobs back (eight entries; a copy failing for good counted dead twice, and the run
    ended 'incomplete' with jobs pending). Now the second, or a retry-dead, is refused in one line while the first
    runs, and the first adds each lost job once."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("TWICE", 4), now=now).run_id
    client.delete(stream_key("normal"))
    real = runs._jobs_of_list
    inner: list[BaseException | int] = []

    def meanwhile(blob: bytes) -> list[tuple[str, str, bool]]:
        monkeypatch.setattr(runs, "_jobs_of_list", real)  # the inner requeue reads as usual
        for again in (runs.requeue_lost, runs.retry_dead):  # between the first's reads and its adds
            try:
                inner.append(again(client, run))
            except JobError as exc:
                inner.append(exc)
        return real(blob)

    monkeypatch.setattr(runs, "_jobs_of_list", meanwhile)
    assert runs.requeue_lost(client, run) == 4
    assert client.xlen(stream_key("normal")) == 4
    assert [str(e) for e in inner] == [
        f"run {run!r}: a `jobs requeue` or `jobs retry-dead` of it is running; run `jobs {action} {run}` again "
        "once it has ended"
        for action in ("requeue", "retry-dead")
    ]
    assert client.exists(f"refresher:run:{run}:requeue-lock") == 0  # released
    assert runs.requeue_lost(client, run) == 0


def test_a_retry_promoted_after_the_stream_read_is_not_requeued(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's job fails after requeue's first read of the retries and before its stream read reaches it, and
    is promoted back to the stream's end once that read has ended: seen in neither read, it was added again."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("PROMO", 4), now=now).run_id
    queue = JobQueue(client)
    [in_hand] = queue.read("w", block_ms=0, count=1)
    [(second, _fields)] = client.xrange(stream_key("normal"), "(" + in_hand.message_id, "+", count=1)
    client.xdel(stream_key("normal"), second)  # one job lost
    real = runs._entries
    reads = 0

    def failed_then_promoted(client: redis.Redis, stream: str, chunk: int, *after: str) -> Any:
        nonlocal reads
        reads += stream == stream_key("normal")
        if reads == 1 and stream == stream_key("normal"):
            queue.retry_later(in_hand, due=now.timestamp() - 1)
        yield from real(client, stream, chunk, *after)
        if reads == 1 and stream == stream_key("normal"):
            assert queue.promote_due(now.timestamp()) == 1

    monkeypatch.setattr(runs, "_entries", failed_then_promoted)
    assert runs.requeue_lost(client, run) == 1
    segments = [json.loads(f[b"job"])["seg"] for _id, f in client.xrange(stream_key("normal"))]
    assert sorted(segments) == sorted(str(j.segment) for j in jobs("PROMO", 4))  # each once


@pytest.mark.parametrize("how", ["cancel", "delete"])
def test_a_requeue_cut_short_by_cancel_or_delete_says_so(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """It said '1 lost job(s) back on the queue' and exit 0 for a run cancelled or deleted between two chunks."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("CUT", 3), now=now).run_id
    client.delete(stream_key("normal"))
    real = client.register_script

    def stopped_after_the_first(script: str) -> Any:
        adds = real(script)
        if script != runs.REQUEUE:
            return adds

        def first_then_stop(**kwargs: Any) -> Any:
            result = adds(**kwargs)
            if int(result) < 0:
                return result
            if how == "cancel":
                runs.cancel_run(client, run)
            else:
                runs.delete_run(client, run, force=True)
            return result

        return first_then_stop

    monkeypatch.setattr(client, "register_script", stopped_after_the_first)
    why = "cancelled meanwhile" if how == "cancel" else "deleted meanwhile"
    with pytest.raises(JobError, match=f"{why}, requeue stopped after 1 of 3 lost job"):
        runs.requeue_lost(client, run, chunk=1)


def test_a_segment_dead_lettered_twice_counts_once(redis_server: RedisServer) -> None:
    """Two copies of one job (put back twice) both failing for good made dead 2: 'done + dead >= total' ended the
    run incomplete with a job still pending, and retry-dead revived two copies."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("DUP", 2), now=now).run_id
    [(_first, fields), _pending] = client.xrange(stream_key("normal"))
    client.xadd(stream_key("normal"), {"job": fields[b"job"]})  # the first job's copy
    queue = JobQueue(client)
    [one, _two, copy] = queue.read("w", block_ms=0, count=3)
    assert one.job["seg"] == copy.job["seg"]
    queue.dead_letter(one, "permanent: bad row", 3)
    queue.dead_letter(copy, "permanent: bad row", 3)
    state = run_status(client, run)
    assert (state.state, state.dead, client.xlen("refresher:dead")) == ("queued", 1, 1)
    assert runs.retry_dead(client, run) == 1
    [revived] = [d for d in queue.read("w", block_ms=0, count=5) if d.job["seg"] == one.job["seg"]]
    queue.dead_letter(revived, "permanent: bad row", 3)  # dead again after a retry-dead: counted again
    assert run_status(client, run).dead == 1


def test_a_segment_dead_then_loaded_by_its_other_copy_counts_done_only(redis_server: RedisServer) -> None:
    """One copy of a job dead-lettered, then its other copy (a reclaim, a requeue) loaded it: done 1 and dead 1
    for one segment ended the run incomplete with a job pending, and retry-dead revived the loaded segment,
    whose no-op rerun counted nothing, so the run stayed queued for good."""
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    run = submit_jobs(client, spec("normal"), jobs("DUP", 3), now=now).run_id
    [(_first, fields), *_pending] = client.xrange(stream_key("normal"))
    client.xadd(stream_key("normal"), {"job": fields[b"job"]})  # the first job's copy
    queue = JobQueue(client)
    [one, two, three, copy] = queue.read("w", block_ms=0, count=4)
    assert one.job["seg"] == copy.job["seg"]
    queue.dead_letter(one, "permanent: bad row", 3)
    queue.finish(copy, 1, True, time.time())
    queue.finish(two, 1, True, time.time())
    state = run_status(client, run)
    assert (state.state, state.done, state.dead) == ("queued", 2, 0)  # three is still pending
    assert runs.retry_dead(client, run) == 0
    assert client.xlen("refresher:dead") == 0
    assert queue.finish(three, 1, True, time.time())  # the run's last
    assert run_status(client, run).state == "loaded"


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP): its state in /proc/PID/stat is T."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize("action", ["requeue", "retry-dead"])
def test_a_requeue_stopped_past_its_lock_writes_nothing_once_another_holds_the_run(
    tmp_path: Path, redis_server: RedisServer, action: str
) -> None:
    """A requeue (or retry-dead) stopped (SIGSTOP) past its lock's expiry, its renewal stopped with it, while a
    second requeue took the lock and put the lost jobs back: resumed, it put them back again (eight entries for four
    jobs). Its writes check the lock is still its own: one line, exit 2, nothing written."""
    client = connect(redis_server.url)
    run = submit_jobs(client, spec("normal"), jobs("STALL", 4), now=dt.datetime.now(dt.UTC)).run_id
    lock = f"refresher:run:{run}:requeue-lock"
    if action == "requeue":
        client.delete(stream_key("normal"))  # four jobs lost
    else:
        for delivery in JobQueue(client).read("w", block_ms=0, count=2):
            JobQueue(client).dead_letter(delivery, "permanent: bad row", 3)
    stalled = start_refresher(
        tmp_path,
        "jobs",
        action,
        run,
        "--queue",
        redis_server.url,
        module=("tests.refresher.jobs.stalled_requeue", "2"),
    )
    try:
        deadline = time.monotonic() + 120
        while not _stopped(stalled.pid) and stalled.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _stopped(stalled.pid), stalled.communicate()
        while client.exists(lock) and time.monotonic() < deadline:  # its lock expires, in Redis's own time
            time.sleep(0.05)
        assert not client.exists(lock)
        if action == "requeue":
            second = refresher(tmp_path, "jobs", "requeue", run, "--queue", redis_server.url)
            assert second.returncode == 0 and "4 lost job(s) back" in second.stdout, second.stderr
        else:  # another holder: a requeue between its reads, say
            assert client.lock(lock, timeout=60, thread_local=False).acquire(blocking=False)
        os.kill(stalled.pid, signal.SIGCONT)
        out, err = stalled.communicate(timeout=120)
    finally:
        reap(stalled)
    done = subprocess.CompletedProcess(stalled.args, stalled.returncode, out, err)
    one_line(done, run, f"this `jobs {action}` was held up past its 2 s lock", "stopped after 0 ")
    if action == "requeue":
        segments = [json.loads(f[b"job"])["seg"] for _id, f in client.xrange(stream_key("normal"))]
        assert sorted(segments) == sorted(str(j.segment) for j in jobs("STALL", 4))  # each once
    else:
        assert (client.xlen("refresher:dead"), run_status(client, run).dead) == (2, 2)  # none revived


def test_a_submit_refused_midway_by_redis_at_its_maxmemory_names_its_run_whose_missing_jobs_requeue_adds(
    redis_server: RedisServer,
) -> None:
    # The refusal was a traceback (OutOfMemoryError) naming no run, and its missing jobs showed lost only once the
    # submit's key expired, a minute later.
    client = connect(redis_server.url)
    now = dt.datetime.now(dt.UTC)
    submit_jobs(client, spec("normal"), jobs("ROOM", 1), now=now)  # the streams made
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 200_000)
    with pytest.raises(JobError) as refused:
        submit_jobs(client, spec("normal"), jobs("FULL", 5000), now=now, chunk=100)
    message = str(refused.value)
    run = message.split()[1].rstrip(":")
    assert message.startswith(f"run {run}: Redis is out of memory") and f"jobs requeue {run}`" in message, (
        message
    )
    lost = run_status(client, run).lost
    assert 0 < lost < 5000
    client.config_set("maxmemory", 0)
    assert (
        runs.requeue_lost(client, run) == lost + 1
    )  # the status's lower bound: ROOM's job is in the stream too
    state = run_status(client, run)
    assert (state.lost, state.pending) == (0, 5000)
    assert client.xlen(stream_key("normal")) == 5001
