"""Since when a run's target has been found down: one record per run in Redis (``run:{id}:target-down``), kept by
Redis's clock and shared by every worker of the queue, on any machine.

A worker that finds a run's target down waits, no attempt spent, until the run's target has been found down for
its ``target_down_wait`` (``Worker._target_down_wait``). Two findings are timed apart: ``CONNECT``, connections
refused, over once the target answers any worker; ``SESSION``, the features step's session lost (a restart), over
only when the step ends, so a step that crashes its server each time spends its attempts in the end.

Each worker kept its own record, in its memory, ended only by its own connection or its own end of the step. So
it outlived what it timed: after `jobs retry-dead` with the target still down, the revived jobs (or features) were
judged by the old start and spent their attempts at once, unwaited; a worker that backed off kept its record after
another worker ended the step, and judged the run's next step by it. Now what ends a wait removes the record in
the script that ends it: ``jobs retry-dead`` (``REVIVE``, ``REVIVE_FEATURES``), the features step's end (complete,
failed for good), the run's delete. ``CONNECT``'s half ends too on any sign the target answers: a connection made
(``target_answers``), a job of the run loaded (``_FINISH``, ``answered_lua``); and it is forgotten once no worker
has found the target down for ``forgotten_after`` (``found_down``). Ended only by a connection made, one worker's
finding in a blip outlived it while another loaded the rest of the run on the session it kept: hours later a
15 s restart was judged down for hours, and the jobs that met it spent their attempts at once.
"""

from __future__ import annotations

import redis

from refresher.jobs.namespace import Namespace

CONNECT = "connect"
SESSION = "session"

# The fields of ``CONNECT``'s half: since, how many findings, the last (``_FOUND_DOWN``).
_CONNECT_FIELDS = (f"{CONNECT}:since", f"{CONNECT}:times", f"{CONNECT}:last")


def answered_lua(key: str) -> str:
    """Lua that ends ``CONNECT``'s half of the record at ``key`` (a script's ``KEYS[n]``), as ``target_answers``
    does, in the script that records the target answering (a job of the run loaded: ``queue._FINISH``)."""
    fields = ", ".join(f"'{field}'" for field in _CONNECT_FIELDS)
    return f"redis.call('HDEL', {key}, {fields})"


# KEYS: the record, the run's hash; ARGV[1]: CONNECT or SESSION; ARGV[2]: milliseconds after which a CONNECT half no
# finding added to is forgotten. Returns {findings so far, milliseconds since the first}, by Redis's clock. A run
# gone (deleted) gets no record made again, a key nobody would remove: {1, 0}.
_FOUND_DOWN = f"""
if redis.call('HEXISTS', KEYS[2], 'spec') == 0 then return {{1, 0}} end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[1] == '{CONNECT}' then
  local last = redis.call('HGET', KEYS[1], '{CONNECT}:last')
  if last and ms - tonumber(last) > tonumber(ARGV[2]) then
    {answered_lua("KEYS[1]")}
  end
  redis.call('HSET', KEYS[1], '{CONNECT}:last', ms)
end
redis.call('HSETNX', KEYS[1], ARGV[1] .. ':since', ms)
local times = redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':times', 1)
return {{times, ms - tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':since'))}}
"""


def record_key(ns: Namespace, run: str) -> str:
    """The run's record; removed, by this name, in the scripts that end its waits (``queue``)."""
    return ns.run(run, "target-down")


def found_down(
    client: redis.Redis, ns: Namespace, run: str, what: str, *, forgotten_after: float
) -> tuple[int, float]:
    """Count a finding of the run's target down (``what``: ``CONNECT`` or ``SESSION``); returns how many there
    have been, by any worker, and the seconds since the first.

    A ``CONNECT`` half no worker has added to for ``forgotten_after`` seconds is an earlier outage's, one that
    nothing seen ended (the workers that met it stopped, or busy on other runs): this finding starts a new one. An
    outage still going on is found again within a backoff (at most ``backoff_cap``) by each worker that meets
    it, so ``forgotten_after`` above both the cap and ``target_down_wait`` never cuts one short. ``SESSION``'s half
    is never forgotten: a features step that crashes its server each time may run longer than any such bound
    between two findings, and would be waited for without end; the step's end removes it."""
    script = client.register_script(_FOUND_DOWN)
    keys = [record_key(ns, run), ns.run(run)]
    times, elapsed_ms = script(keys=keys, args=[what, int(forgotten_after * 1000)])
    return int(times), int(elapsed_ms) / 1000


def target_answers(client: redis.Redis, ns: Namespace, run: str) -> None:
    """A worker connected to the run's target: a next refusal is timed from its own start (``CONNECT``)."""
    client.hdel(record_key(ns, run), *_CONNECT_FIELDS)


__all__ = ["CONNECT", "SESSION", "answered_lua", "found_down", "record_key", "target_answers"]
