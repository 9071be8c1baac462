"""A worker holds the cyclic collector back while it runs a batch of jobs, and gives it back between batches, after
a job that failed and after an error that leaves the batch: a worker runs for hours. Real Redis, a real embedded
Postgres, the worker in this process (the collector's state is this process's)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import redis

from refresher._gc import YOUNG_THRESHOLD
from refresher.jobs import worker as worker_module
from refresher.jobs.queue import JobQueue
from refresher.jobs.segment import load_produced, produce_tables
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.settings import Settings
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import status, submit, workspace
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared with test_worker


def test_the_collector_is_held_in_a_batch_and_given_back_between_batches_after_failures(
    workspace: Workspace, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, url = workspace, redis_server.url
    run = submit(ws, url)["run_id"]
    before = gc.get_threshold()
    held = (max(before[0], YOUNG_THRESHOLD), *before[1:])
    inside: list[tuple[tuple[int, ...], int]] = []
    between: list[tuple[tuple[int, ...], int]] = []
    read = JobQueue.read
    loads = iter(range(10_000))
    productions = iter(range(10_000))

    def observed_load(*args: Any) -> Any:
        inside.append((gc.get_threshold(), gc.get_freeze_count()))
        if next(loads) == 1:
            raise ValueError("a failing job")  # permanent: dead-lettered at once (poison_attempts=1)
        return load_produced(*args)

    def observed_produce(*args: Any) -> Any:
        if next(productions) == 1:
            raise redis.ConnectionError(
                "Redis went away"
            )  # leaves the batch: the loop backs off and reads again
        return produce_tables(*args)

    def observed_read(self: JobQueue, *args: Any, **kwargs: Any) -> Any:
        between.append((gc.get_threshold(), gc.get_freeze_count()))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(worker_module, "load_produced", observed_load)
    monkeypatch.setattr(worker_module, "produce_tables", observed_produce)
    monkeypatch.setattr(JobQueue, "read", observed_read)
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions(
        "gc",
        burst=True,
        batch=4,
        visibility_timeout=2,
        poison_attempts=1,
        backoff_base=0.01,
        backoff_cap=0.05,
    )
    report = Worker(url, settings, options).run()

    state = status(ws, url, run)
    assert (report.dead, state["dead"]) == (1, 1) and state["done"] == state["total"] - 1
    assert len(inside) == state["total"] and len(between) > 3
    assert all(threshold == held and frozen > 0 for threshold, frozen in inside)
    assert all(entry == (before, 0) for entry in between)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)
