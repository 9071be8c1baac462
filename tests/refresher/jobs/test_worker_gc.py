"""A worker holds the cyclic collector back while it runs a batch of jobs, and gives it back between batches, after
a job that failed and after an error that leaves the batch: a worker runs for hours. Real Redis, a real embedded
Postgres, the worker in this process (the collector's state is this process's)."""

from __future__ import annotations

import gc
import threading
import weakref
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
    assert all(entry == (held, 0) for entry in inside)  # nothing frozen: see the next test
    assert all(entry == (before, 0) for entry in between)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)


class _Node:
    """A cycle: freed only by the cyclic collector."""

    def __init__(self) -> None:
        self.me = self


def test_two_consumer_threads_overlapping_batches_hold_the_collector_and_keep_no_garbage(
    workspace: Workspace, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --concurrency 2: one thread's batch ends while the other's runs, so the hold can last as long as batches
    # overlap (for hours, on a busy worker). Every load must run with the collector held, the collector must be
    # whole again after, and garbage must not wait for a gap between batches: a cycle the worker had when the
    # batches began and dropped while both run is found by the next full collection, not kept frozen.
    ws, url = workspace, redis_server.url
    submit(ws, url)
    before = gc.get_threshold()
    held = (max(before[0], YOUNG_THRESHOLD), *before[1:])
    inside: list[tuple[int, ...]] = []
    both_in_a_batch = threading.Barrier(2, timeout=120)
    checked = threading.Event()
    first_load: set[int] = set()
    kept = [_Node()]
    cycle = weakref.ref(kept[0])
    found: list[bool] = []

    def observed_load(*args: Any) -> Any:
        inside.append(gc.get_threshold())
        if threading.get_ident() not in first_load:
            first_load.add(threading.get_ident())
            if both_in_a_batch.wait() == 0:
                kept.clear()  # garbage now, while the other thread's batch runs
                gc.collect()
                found.append(cycle() is None)
                checked.set()
            else:
                checked.wait(120)
            inside.append(gc.get_threshold())  # the other thread's batch may have ended meanwhile
        return load_produced(*args)

    monkeypatch.setattr(worker_module, "load_produced", observed_load)
    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions("gc2", concurrency=2, burst=True, batch=2, visibility_timeout=30)
    report = Worker(url, settings, options).run()

    assert report.dead == 0 and len(first_load) == 2
    assert found == [True]
    assert inside and all(threshold == held for threshold in inside)
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, 0)
