"""Since when a run's target has been found down: one record per run in Redis (``run:{id}:target-down``), kept by
Redis's clock and shared by every worker of the queue, on any machine.

A worker that finds a run's target down waits, no attempt spent, until the run's target has been found down for
its ``target_down_wait`` (``Worker._target_down_wait``). Two findings are timed apart: ``CONNECT``, connections
refused, over once any worker connects; ``SESSION``, the features step's session lost (a restart), over only when
the step ends, so a step that crashes its server each time spends its attempts in the end.

Each worker kept its own record, in its memory, ended only by its own connection or its own end of the step. So
it outlived what it timed: after `jobs retry-dead` with the target still down, the revived jobs (or features) were
judged by the old start and spent their attempts at once, unwaited; a worker that backed off kept its record after
another worker ended the step, and judged the run's next step by it. Now what ends a wait removes the record in
the script that ends it: ``jobs retry-dead`` (``REVIVE``, ``REVIVE_FEATURES``), the features step's end (complete,
failed for good), the run's delete; and a connection made, ``CONNECT``'s half (``target_answers``).
"""

from __future__ import annotations

import redis

from refresher.jobs.namespace import Namespace

CONNECT = "connect"
SESSION = "session"

# KEYS: the record, the run's hash; ARGV[1]: CONNECT or SESSION. Returns {findings so far, milliseconds since the
# first}, by Redis's clock. A run gone (deleted) gets no record made again, a key nobody would remove: {1, 0}.
_FOUND_DOWN = """
if redis.call('HEXISTS', KEYS[2], 'spec') == 0 then return {1, 0} end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSETNX', KEYS[1], ARGV[1] .. ':since', ms)
local times = redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':times', 1)
return {times, ms - tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':since'))}
"""


def record_key(ns: Namespace, run: str) -> str:
    """The run's record; removed, by this name, in the scripts that end its waits (``queue``)."""
    return ns.run(run, "target-down")


def found_down(client: redis.Redis, ns: Namespace, run: str, what: str) -> tuple[int, float]:
    """Count a finding of the run's target down (``what``: ``CONNECT`` or ``SESSION``); returns how many there
    have been, by any worker, and the seconds since the first."""
    script = client.register_script(_FOUND_DOWN)
    times, elapsed_ms = script(keys=[record_key(ns, run), ns.run(run)], args=[what])
    return int(times), int(elapsed_ms) / 1000


def target_answers(client: redis.Redis, ns: Namespace, run: str) -> None:
    """A worker connected to the run's target: a next refusal is timed from its own start (``CONNECT``)."""
    client.hdel(record_key(ns, run), f"{CONNECT}:since", f"{CONNECT}:times")


__all__ = ["CONNECT", "SESSION", "found_down", "record_key", "target_answers"]
