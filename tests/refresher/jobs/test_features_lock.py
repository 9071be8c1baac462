"""The lock one worker holds while it computes a run's features: renewed while it works, gone soon after it dies."""

from __future__ import annotations

import time

import pytest

from refresher.jobs.queue import held_lock
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def test_a_live_holder_keeps_the_lock_past_its_timeout_and_frees_it_when_done(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    held = client.lock("run:features-lock", timeout=3, blocking=False, thread_local=False)
    other = client.lock("run:features-lock", timeout=3, blocking=False, thread_local=False)
    assert held.acquire()
    with held_lock(held, every=0.5):
        time.sleep(7)  # well past the 3 s timeout
        assert not other.acquire()
    assert other.acquire()  # released at once, not after a timeout


def test_a_dead_holder_loses_the_lock_after_one_timeout(redis_server: RedisServer) -> None:
    client = redis_server.client()
    dead = client.lock("run:features-lock", timeout=0.5, blocking=False, thread_local=False)
    assert dead.acquire()  # and never renewed nor released, as by a worker killed with -9
    other = client.lock("run:features-lock", timeout=0.5, blocking=False, thread_local=False)
    assert not other.acquire()
    deadline = time.monotonic() + 10
    while not other.acquire():
        assert time.monotonic() < deadline, "the dead holder's lock never expired"
        time.sleep(0.05)
