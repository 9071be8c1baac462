"""Our Redis Streams queue (redis-py) against a queue library on the same Redis: submit, then claim and ack.

The library is taskiq-redis's ``RedisStreamBroker`` (a bench-only dependency, ``pip install -e .[bench]``),
driven at its broker level, the least it does per job: ``.kiq()`` on a task (one XADD each), then ``listen()``
(XREADGROUP of up to 100, then an XAUTOCLAIM under a lock) and ``ack()`` (one XACK each). Ours is what a
worker does per job: ``submit_jobs`` (pipelined XADD in chunks of 1,000 plus the run's hash), then
``JobQueue.read`` (up to 16 per read, weighted over four tier streams), ``started`` (the in-flight mark) and
``finish`` (XACK and the run's counters in one Lua script). No job runs: this is the queue's own cost.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from refresher.jobs.queue import JobQueue, connect
from refresher.jobs.runs import RunSpec, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.segments import Segment
from tests.redis_server import RedisServer

LIBRARY = "taskiq_redis"


def _jobs(n: int) -> list[SegmentJob]:
    months = [dt.date(2020 + m // 12, m % 12 + 1, 1) for m in range(60)]
    return [
        SegmentJob(Segment(f"S{i // 60:04d}", "1d", months[i % 60]), f"key-{i}", "UTC")  # type: ignore[arg-type]
        for i in range(n)
    ]


def _ours(url: str, n: int) -> tuple[float, float]:
    """Seconds to submit ``n`` jobs, and to claim and acknowledge them all, through our queue."""
    client = connect(url)
    spec = RunSpec("bench", "/bench.yaml", "2025-10-31", "host=db dbname=bench", False)
    began = time.perf_counter()
    submit_jobs(client, spec, _jobs(n), now=dt.datetime.now(dt.UTC), chunk=1000)
    submitted = time.perf_counter() - began
    queue = JobQueue(client)
    began, acked = time.perf_counter(), 0
    while acked < n:
        for delivery in queue.read("bench-0", 0, count=16):
            queue.started(delivery, "bench-0", time.time())
            queue.finish(delivery, 21, True, time.time())
            acked += 1
    return submitted, time.perf_counter() - began


async def _library(url: str, n: int) -> tuple[float, float]:
    """The same through taskiq-redis's stream broker."""
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(url, queue_name="bench-taskiq", xread_block=100)

    @broker.task
    async def load_segment(seg: str, key: str, tz: str) -> None:  # never runs: only its messages are timed
        return None

    await broker.startup()
    try:
        began = time.perf_counter()
        for job in _jobs(n):
            await load_segment.kiq(str(job.segment), job.key, job.tz)
        submitted = time.perf_counter() - began
        began, acked = time.perf_counter(), 0
        async for message in broker.listen():
            await message.ack()  # type: ignore[misc]
            acked += 1
            if acked == n:
                break
        return submitted, time.perf_counter() - began
    finally:
        await broker.shutdown()


def run(quick: bool = False) -> list[dict[str, Any]]:
    n = 5_000 if quick else 30_000
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-queue-", dir="/tmp"))
    server = RedisServer.started(work)
    try:
        ours_submit, ours_ack = _ours(server.url, n)
        rows: list[dict[str, Any]] = []
        if importlib.util.find_spec(LIBRARY) is None:
            return [
                {
                    "benchmark": f"submit, {n:,} jobs: ours",
                    "ours": n / ours_submit,
                    "unit": "jobs/s",
                    "note": "taskiq-redis is not installed (pip install -e .[bench]): no baseline",
                }
            ]
        server.client().flushall()
        lib_submit, lib_ack = asyncio.run(_library(server.url, n))
        for what, ours, theirs, note in (
            ("submit", ours_submit, lib_submit, "ours: pipelined XADD; taskiq: one XADD per .kiq()"),
            (
                "claim + ack",
                ours_ack,
                lib_ack,
                "ours: XREADGROUP of 16, in-flight mark, Lua ack + counters per job; taskiq: XREADGROUP of "
                "100 + XAUTOCLAIM, XACK per job",
            ),
        ):
            rows.append(
                {
                    "benchmark": f"{what}, {n:,} jobs: ours vs taskiq-redis RedisStreamBroker",
                    "ours": n / ours,
                    "baseline": n / theirs,
                    "unit": "jobs/s",
                    "ratio": theirs / ours,
                    "note": note,
                }
            )
        return rows
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
