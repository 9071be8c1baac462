"""A Redis whose maxmemory-policy evicts keys drops the queue's jobs, counters and locks without a word: the worker
and `jobs submit` refuse it at their start, one line, exit status 2; a Redis that will not tell its policy (CONFIG
refused, as managed Redis does) is one warning line, and the command goes on. Against a real redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.refresher.jobs.test_cli_queue import one_line, refresher

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
def test_an_evicting_policy_is_refused_by_the_worker_and_by_submit(
    tmp_path: Path, redis_server: RedisServer, policy: str
) -> None:
    # Both ran: a run's jobs, its counters, its features lock (volatile-*: a key with a TTL) could go at Redis's
    # maxmemory, and its status said nothing of it.
    client = redis_server.client()
    client.config_set("maxmemory-policy", policy)
    for command in (["worker", "--burst", "--name", "w"], ["jobs", "submit", "--profile", "q"]):
        done = refresher(tmp_path, *command, "--queue", redis_server.url)
        one_line(done, f"maxmemory-policy is {policy}", "CONFIG SET maxmemory-policy noeviction")
    assert client.dbsize() == 0  # no run recorded, no consumer group made
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("postmaster.pid"))


def test_a_redis_that_will_not_tell_its_policy_is_one_warning_line_and_the_worker_runs(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A managed Redis refusing CONFIG (here an ACL user without it): the policy may well be noeviction."""
    client = redis_server.client()
    commands = ["+@all", "-config"]
    client.acl_setuser(
        "loader", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=commands
    )
    url = f"redis://loader:pw@127.0.0.1:{redis_server.port}/0"
    done = refresher(tmp_path, "worker", "--burst", "--name", "w", "--queue", url)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "maxmemory-policy" in line]
    assert "cannot read Redis's maxmemory-policy" in line and "make sure it is noeviction" in line, line
    assert "pw" not in line.replace("loader:***", ""), line  # the password is not shown
