"""The Redis side of segment jobs: key names, the four priority streams, and the scripts that move a job.

Layout (every key under its namespace's prefix, ``refresher:`` by default: ``refresher.jobs.namespace``):

- ``jobs:{tier}``: one stream per priority tier, consumer group ``workers``; an entry is one job (JSON).
- ``dead``: the dead-letter stream (job, error text, attempts).
- ``retry``: sorted set of jobs waiting out a backoff, scored by when they are due.
- ``run:{id}``: a hash with the run's spec and counters; ``run:{id}:done`` the set of finished segments (a
  segment counts once however often it is delivered); ``run:{id}:inflight`` message id -> consumer;
  ``run:{id}:held`` the jobs of a held run; ``run:{id}:dead-segs`` its dead-lettered segments (each counted once); ``run:{id}:jobs`` every job the run was submitted with (a line each,
  zlib-compressed, for ``jobs requeue``); ``run:{id}:target-down`` since when its target is found down
  (``refresher.jobs.target_down``); ``runs`` sorted set of run ids by submit time; ``features-due``
  runs whose segments are all loaded and whose features no worker has computed yet; ``deleting`` runs removed
  whose entries in the streams, dead letters and retries may be left (``runs.delete_runs``).

Every state change of a job (ack + counters, ack + retry, ack + dead letter, promotion) is one Lua script, so a
Redis restart between two commands cannot leave a job both acknowledged and uncounted.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from refresher.errors import JobError, one_line
from refresher.jobs.namespace import DEFAULT, Namespace, split_queue_url
from refresher.jobs.retry import backoff_seconds
from refresher.jobs.target_down import answered_lua, record_key
from refresher.jobs.tiers import TIERS as TIERS
from refresher.jobs.tiers import WEIGHTS as WEIGHTS

GROUP = "workers"
# The default namespace's keys by the names they had before namespaces (``refresher.jobs.namespace``), for tests
# and scripts that look into a default queue: the library itself names every key through the queue's ``Namespace``.
PREFIX = DEFAULT.prefix
RUNS = DEFAULT.runs
DEAD = DEFAULT.dead
RETRY = DEFAULT.retry
FEATURES_DUE = DEFAULT.features_due
HELD = DEFAULT.held
# Runs whose keys are removed but whose stream entries, dead letters and retries may not be yet: a prune or delete
# killed between its two steps leaves them here, and the next one removes what is left.
DELETING = DEFAULT.deleting
# Runs removed whose fence row (``refresher.fence``) their target may still hold, each with its spec (the target):
# written in the step that removes the runs' keys, read and cleared once the prune tried their targets; a prune
# killed before that leaves them here, and the next one tries them.
FENCES_DUE = DEFAULT.fences_due


def text(value: Any) -> str:
    """A Redis reply as text (replies are bytes; the client's stubs admit str too)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_key(tier: str) -> str:
    """The default namespace's stream of ``tier`` (``Namespace.stream``)."""
    return DEFAULT.stream(tier)


def redis_time(client: redis.Redis) -> float:
    """Redis's clock (``TIME``), in seconds since the epoch: the one clock of every run's times."""
    seconds, micros = client.time()
    return float(seconds + micros / 1e6)


def run_key(run_id: str, part: str = "") -> str:
    """The default namespace's key of a run (``Namespace.run``)."""
    return DEFAULT.run(run_id, part)


def features_fence_name(run_id: str) -> str:
    """The name of a run's fence in its target (``refresher.fence``), which the holder of its features lock claims."""
    return f"features:{run_id}"


def no_such_run(run_id: str, ns: Namespace = DEFAULT) -> JobError:
    where = "" if ns.is_default else f" in namespace {ns.name!r}"
    return JobError(
        f"run {run_id!r}: no such run{where} (see `refresher jobs list`)", field="run", value=run_id
    )


def run_spec(client: redis.Redis, run_id: str, ns: Namespace = DEFAULT) -> dict[str, Any] | None:
    """A run's spec; None when its hash has none: never submitted, or deleted by hand (Redis's data lost), with
    perhaps what a worker's counter left of it. Every check that a run is still there is this one, or, in the
    scripts, ``run_gone`` (``_RUN_GONE``)."""
    raw = client.hget(ns.run(run_id), "spec")
    return json.loads(raw) if raw is not None else None


def require_run(client: redis.Redis, run_id: str, ns: Namespace = DEFAULT) -> dict[str, Any]:
    """A run's spec, or the one line that there is no such run."""
    spec = run_spec(client, run_id, ns)
    if spec is None:
        raise no_such_run(run_id, ns)
    return spec


def public_url(url: str) -> str:
    """The queue URL as it may be printed: its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


# Tries of a command whose connection dropped (a Redis restart), jittered up to 2 s apart.
RETRIES = 8


def _retry(retries: int) -> Retry:
    return Retry(
        EqualJitterBackoff(cap=2.0, base=0.05),
        retries=retries,
        supported_errors=(redis.ConnectionError, redis.TimeoutError),
    )


# How long a connection may take to open, and a reply to come, before the try is given up (``connect``) and the
# command tried again on a new connection. The longest reply a client of ours waits for by design is the worker's
# blocking read (``WorkerOptions.block_ms``, 1 s); other commands answer in milliseconds. Set here, not left to
# redis-py: its releases before 8 (which pyproject admits) wait for a reply with no bound, and a worker whose Redis
# host went silent (a partition, a failover to another host, a host powered off: nothing resets the connection)
# sat on its read until the kernel gave the connection up, some 15 minutes later, its jobs idle meanwhile.
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 5.0


def connect(
    url: str,
    *,
    retries: int = RETRIES,
    label: str = "--queue",
    within: float = REPLY_TIMEOUT,
) -> redis.Redis:
    """A client that retries a dropped or silent connection a few times with jittered backoff (a Redis restart,
    a host gone silent: ``REPLY_TIMEOUT``); ``label`` names where the URL came from in an error (``--queue``,
    ``REFRESHER_QUEUE``); ``within``: a bound below ``REPLY_TIMEOUT`` (and ``CONNECT_TIMEOUT``) for each try, for
    a question that must be answered by then (``wait_for_queue``)."""
    # The namespace is ours: redis-py hands a parameter it does not know to each connection, which refuses it.
    redis_url, _ns = split_queue_url(url, label)
    try:
        client = redis.Redis.from_url(
            redis_url,
            retry=_retry(retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_connect_timeout=min(CONNECT_TIMEOUT, within),
            socket_timeout=min(REPLY_TIMEOUT, within),
            health_check_interval=10,
        )
    except ValueError as exc:
        shown = public_url(url)
        raise JobError(f"{label}={shown!r}: not a Redis URL ({exc})", field="queue", value=shown) from exc
    return client


def unreachable(url: str, exc: Exception, label: str = "--queue") -> JobError:
    """The one-line error for a Redis that does not answer."""
    reason = one_line(exc)
    shown = public_url(url)
    return JobError(f"{label}={shown}: cannot reach Redis ({reason})", field="queue", value=shown)


def out_of_memory(url: str, exc: Exception, label: str = "--queue") -> JobError:
    """The one-line error for a Redis at its maxmemory refusing a write (policy noeviction)."""
    shown = public_url(url)
    return JobError(
        f"{label}={shown}: Redis is out of memory, it refused a write ({one_line(exc)}): "
        "remove finished runs (`refresher jobs prune`) or raise its maxmemory",
        field="queue",
        value=shown,
    )


def open_queue(url: str, label: str = "--queue") -> redis.Redis:
    """A client (``connect``) whose Redis was asked once, with one retry: not there, not a Redis server, or
    refusing us (a password, a database number out of range) is one line at once, not a traceback, nor
    seconds of retries before the first word. The client that asked is the one returned, its connection kept,
    with ``connect``'s retries from then on."""
    try:
        return _asked(url, label)
    except redis.RedisError as exc:
        raise _refusal(url, exc, label) from exc


def _asked(url: str, label: str, within: float | None = None) -> redis.Redis:
    """``open_queue``'s one question: the client, or Redis's error (the client closed). ``within``: its two tries
    (``connect``'s one retry) answered or given up by then, each in half of it at most (``wait_for_queue`` asks
    again), and a client asked with bounds shorter than the usual is replaced by one of the usual bounds once
    answered; None: the usual bounds, and the client that asked is returned, its connection kept."""
    bound = REPLY_TIMEOUT if within is None else min(within / 2, REPLY_TIMEOUT)
    client = connect(url, retries=1, label=label, within=bound)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        raise
    if bound < REPLY_TIMEOUT:
        client.close()
        return connect(url, label=label)
    client.set_retry(_retry(RETRIES))
    return client


def _refusal(url: str, exc: redis.RedisError, label: str) -> JobError:
    """The one line for a queue that did not answer ``open_queue``'s question."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return unreachable(url, exc, label)
    # InvalidResponse: something else answers there; ResponseError: refused
    shown = public_url(url)
    return JobError(f"{label}={shown}: not a usable Redis ({one_line(exc)})", field="queue", value=shown)


def _not_up_yet(exc: BaseException) -> bool:
    """A Redis that may answer if asked again: the connection refused or timed out (not started, restarting, a
    host still coming up), or Redis still loading its AOF or RDB (``BusyLoadingError``, a ConnectionError). A
    password refused is a ConnectionError too (``AuthenticationError``), but no later try passes it."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError) and not isinstance(
        exc, redis.AuthenticationError
    )


# Between two tries of a worker waiting for Redis at its start: ``backoff_seconds``, full jitter up to this cap, so
# a fleet started together does not ask in step and a Redis up is found within a couple of seconds.
WAIT_BASE = 0.1
WAIT_CAP = 2.0
# The shortest question of that wait (its last, with less time left; two tries of half of it): a loopback or LAN
# connection opens in well under it.
MIN_TRY = 1.0


def wait_for_queue(
    url: str, label: str, timeout: float, stop: threading.Event, on_wait: Callable[[str], None]
) -> redis.Redis | None:
    """``open_queue``, asked again for up to ``timeout`` seconds while Redis is not up yet (``_not_up_yet``): a
    worker started beside its Redis (a service manager, a compose file, a pod) or during its restart. ``on_wait``
    hears one line when the waiting starts, nothing per try; past ``timeout`` the last answer is ``open_queue``'s
    one line. Anything else (not a Redis, a password or database refused) is that line at once: waiting does not
    change it. None when ``stop`` is set meanwhile (SIGTERM, Ctrl-C): the worker stops before it started."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            # Each try bounded by the time left (a host dropping packets: a try of the usual bounds, 5 s to connect
            # and once again, overshot a short --connect-timeout by 10 s), never below MIN_TRY; 0: asked once as usual.
            return _asked(
                url, label, within=max(deadline - time.monotonic(), MIN_TRY) if timeout > 0 else None
            )
        except redis.RedisError as exc:
            left = deadline - time.monotonic()
            if not _not_up_yet(exc) or left <= 0:
                raise _refusal(url, exc, label) from exc
            if attempt == 0:
                on_wait(f"waiting for Redis at {public_url(url)} ({one_line(exc)}); up to {timeout:g} s")
        if stop.wait(min(backoff_seconds(attempt, base=WAIT_BASE, cap=WAIT_CAP), left)):
            return None
        attempt += 1


def ensure_groups(client: redis.Redis, ns: Namespace = DEFAULT) -> None:
    """Make the streams and their group where missing. Asked first: Redis at its maxmemory refuses XGROUP CREATE
    (its OOM check comes before BUSYGROUP) even for a group that exists, and a worker's thread, or a submit, died
    on that refusal."""
    for tier in TIERS:
        if _has_group(client, ns.stream(tier)):
            continue
        try:
            client.xgroup_create(ns.stream(tier), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _has_group(client: redis.Redis, stream: str) -> bool:
    try:
        return any(text(group["name"]) == GROUP for group in client.xinfo_groups(stream))
    except redis.ResponseError:  # no such stream yet (or not a stream: XGROUP CREATE then says so)
        return False


@dataclass(frozen=True)
class Delivery:
    """One job handed to a consumer: where it came from (to acknowledge it) and what it says."""

    tier: str
    message_id: str
    job: dict[str, Any]

    @classmethod
    def parse(cls, stream: bytes | str, message_id: bytes | str, fields: dict[bytes, bytes]) -> Delivery:
        """The entry's job; ValueError when it is not one (no ``job`` field, not JSON, no run or segment)."""
        name = stream.decode() if isinstance(stream, bytes) else stream
        mid = message_id.decode() if isinstance(message_id, bytes) else message_id
        try:
            job = json.loads(fields[b"job"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"no job in it ({one_line(exc)})") from exc
        if not isinstance(job, dict) or not all(isinstance(job.get(k), str) for k in ("run", "seg")):
            raise ValueError("its job names no run and segment")
        return cls(name.rsplit(":", 1)[1], mid, job)


# Every job settled, some dead-lettered: nothing is left to run until `jobs retry-dead`. The run stayed 'queued',
# so `jobs status` said it was waiting and `jobs status --watch` never returned.
_INCOMPLETE = """
local run = redis.call('HMGET', KEYS[2], 'done', 'dead', 'total', 'state')
if run[4] == 'queued' and tonumber(run[1]) + tonumber(run[2]) >= tonumber(run[3]) then
  redis.call('HSET', KEYS[2], 'state', 'incomplete')
end
return 1
"""

# A run whose hash is gone (deleted by hand, Redis's data lost): its job is only acknowledged. Counting it made a
# hash without a spec (`jobs list` then failed on it) and the finish script failed comparing nil, which killed
# the worker's thread, and every worker's the job was delivered to after it.
_RUN_GONE = """
local function run_gone(key) return redis.call('HEXISTS', key, 'spec') == 0 end
"""

# The fence of ``jobs requeue`` and ``jobs retry-dead`` (``runs._requeue_lock``), and of a worker's features step
# (its ``features-lock``): their writes check, in the script that writes, that the run's lock (KEYS[n]) still holds
# this holder's token (ARGV[n]). A holder stopped past the lock's expiry (SIGSTOP, a suspended laptop, a long GC
# pause: its renewal thread stopped too) while another took the lock wrote the jobs that other one put back a second
# time, or the run's features and completion over the other worker's.
_FENCED = """
local function lock_lost(key, token) return redis.call('GET', key) ~= token end
"""

_GONE = (
    _RUN_GONE
    + """
if run_gone(KEYS[2]) then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 0
end
"""
)

# A delivery settled: acknowledged, off the stream, and no longer in flight (KEYS[4]).
_ACK = """
local function ack()
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
end
"""

# A job loaded: acknowledged, its segment counted once. Its commit is the target answering: the connections' wait
# for it is over (KEYS[7], ``target_down.answered_lua``), for every worker; a worker loading on the session it kept
# connects to nothing, and an older finding (another worker's, in a blip) judged a later restart by its start.
_FINISH = (
    _GONE
    + _ACK
    + """
ack()
"""
    + answered_lua("KEYS[7]")
    + """
if redis.call('SADD', KEYS[3], ARGV[3]) == 0 then return 0 end
-- loaded by another copy after one was dead-lettered: no longer dead (done + dead counted it twice); REVIVE
-- drops its dead letter
if redis.call('SREM', KEYS[6], ARGV[3]) == 1 then redis.call('HINCRBY', KEYS[2], 'dead', -1) end
redis.call('HINCRBY', KEYS[2], 'done', 1)
redis.call('HINCRBY', KEYS[2], 'rows', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'loaded', ARGV[5])
redis.call('HSET', KEYS[2], 'last_done_at', ARGV[6])
local done = tonumber(redis.call('HGET', KEYS[2], 'done'))
if done >= tonumber(redis.call('HGET', KEYS[2], 'total')) then
  redis.call('HSET', KEYS[2], 'state', 'loaded')
  redis.call('SADD', KEYS[5], ARGV[7])
  return 2
end
"""
    + _INCOMPLETE
)


# A delivery that fails after another delivery of the same job finished it (a worker paused past the visibility
# timeout, its job reclaimed and loaded meanwhile) is only acknowledged: counted dead or retrying, the loaded
# segment showed as dead, and `jobs retry-dead` set the run queued for good (its no-op rerun counts nothing).
_SETTLED = (
    _ACK
    + """
if redis.call('SISMEMBER', KEYS[5], ARGV[7]) == 1 then
  ack()
  return 0
end
"""
)

_RETRY = (
    _GONE
    + _SETTLED
    + """
ack()
-- two deliveries of one job failing at the same attempt make one member: counted twice, promoted once
if redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'retrying', 1)
end
return 1
"""
)

_DEAD = (
    _GONE
    + _SETTLED
    + """
ack()
-- a second copy of a dead segment (put back twice by hand or an old requeue): acknowledged, not counted again
-- (counted, 'done + dead >= total' ended the run incomplete with jobs still pending)
if redis.call('SADD', KEYS[6], ARGV[7]) == 0 then return 0 end
redis.call('XADD', KEYS[3], '*', 'run', ARGV[3], 'job', ARGV[4], 'error', ARGV[5], 'attempts', ARGV[6])
redis.call('HINCRBY', KEYS[2], 'dead', 1)
"""
    + _INCOMPLETE
)

# The in-flight mark and the run's first start: what `jobs status` shows, nothing a job's fate depends on. Redis at
# its maxmemory (policy noeviction) refuses a script's first write that grows memory: the marks are left out then
# (pcall), and the job runs; its finish (XACK, XDEL) is what frees memory. Refused, it killed the worker's thread.
_START = (
    _RUN_GONE
    + """
if run_gone(KEYS[1]) then return false end
redis.pcall('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.pcall('HSETNX', KEYS[1], 'started_at', ARGV[3])
return redis.call('HGET', KEYS[1], 'state')
"""
)

_DROP = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""

# Due retries go back to their tier's stream; keys are derived inside (one Redis, not a cluster).
_PROMOTE = (
    _RUN_GONE
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, payload in ipairs(due) do
  local job = cjson.decode(payload)
  local run = ARGV[3] .. 'run:' .. job['run']
  if not run_gone(run) then  -- a run deleted meanwhile: its retry goes
    redis.call('XADD', ARGV[3] .. 'jobs:' .. job['tier'], '*', 'job', payload)
    redis.call('HINCRBY', run, 'retrying', -1)
  end
  redis.call('ZREM', KEYS[1], payload)
end
return #due
"""
)

# A held run whose hold has passed: its jobs enter the stream in one step, so none is released twice.
_RELEASE = """
if redis.call('HGET', KEYS[2], 'state') ~= 'held' then return 0 end
if tonumber(redis.call('HGET', KEYS[2], 'held_until_ts')) > tonumber(ARGV[1]) then return 0 end
local jobs = redis.call('LRANGE', KEYS[1], 0, -1)
for _, payload in ipairs(jobs) do
  redis.call('XADD', KEYS[3], '*', 'job', payload)
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued')
return #jobs
"""


# A run's features computed: complete, unless the run was deleted meanwhile (`jobs delete --force`, by hand),
# whose hash this would make again without a spec, a key nobody removes. -1, nothing written, when the run's
# features lock (KEYS[3]) is no longer this worker's (token ARGV[4]; ``_FENCED``; a deleted run's went with it).
# The step over, so are the waits for its target (KEYS[4], ``target_down``): whichever worker ended it.
_COMPLETE = (
    _RUN_GONE
    + _FENCED
    + """
if run_gone(KEYS[1]) then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
if lock_lost(KEYS[3], ARGV[4]) then return -1 end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'features', ARGV[2], 'snapshot', ARGV[3], 'state', 'complete')
redis.call('DEL', KEYS[4])
return 1
"""
)

# A failed features attempt counted: its number, or -1 when the run is gone (then no longer due). After the
# last attempt (ARGV[2]) the run ends incomplete with the error (ARGV[3]). Checked and counted in one step: a
# delete between the check and the count made the hash again without a spec, a key prune never finds. -2, nothing
# counted, when the run's features lock (KEYS[3]) is another worker's (``_FENCED``: it holds another token than
# this worker's, ARGV[4], or another's backoff), or it expired and the run is no longer due (another worker took it
# and finished). A lock that expired under this worker (its renewal late) with no one else on the run is counted:
# uncounted, a stage that always outlives its renewal was tried again and again without end. The last attempt
# ends the waits for the run's target too (KEYS[4], as ``_COMPLETE``).
_FEATURES_FAILED = (
    _RUN_GONE
    + _FENCED
    + """
if run_gone(KEYS[1]) then
  redis.call('SREM', KEYS[2], ARGV[1])
  return -1
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  if lock_lost(KEYS[3], ARGV[4]) then return -2 end
elseif redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  return -2
end
local attempt = redis.call('HINCRBY', KEYS[1], 'features_attempts', 1)
if attempt >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'incomplete', 'error', ARGV[3])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[4])
end
return attempt
"""
)

# A failed features attempt's backoff (ARGV[2] ms) in place of its lock (KEYS[1]), in one step: released first, the
# lock was free for another worker's sweep, which tried again at once. 0, nothing set, when the lock is another
# worker's (token ARGV[1]; ``_FENCED``); an expired one is set.
_FEATURES_BACKOFF = (
    _FENCED
    + """
if redis.call('EXISTS', KEYS[1]) == 1 and lock_lost(KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], 'backoff', 'PX', ARGV[2])
return 1
"""
)

# The fencing token of the holder of a run's features lock (KEYS[1], token ARGV[1]; ``_FENCED``): larger than every
# earlier holder's (KEYS[2] keeps the last), or -1 when the lock is no longer this holder's or the run is gone
# (KEYS[3]; ``_RUN_GONE``). Redis's clock in microseconds unless the last token is ahead of it: a Redis restarted
# with its last second of writes lost (AOF everysec) gives no later holder an earlier holder's token.
# ``refresher.fence`` checks it in the target. A worker whose sweep read a run due just before ``jobs delete
# --force`` removed it takes the run's features lock as a key made anew: it got a token, set KEYS[2] again for
# good (no delete comes again for a run gone), and claimed a fence row in the target that nothing dropped.
_FEATURES_FENCE = (
    _FENCED
    + _RUN_GONE
    + """
if lock_lost(KEYS[1], ARGV[1]) or run_gone(KEYS[3]) then return -1 end
local now = redis.call('TIME')
local token = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if token <= last then token = last + 1 end
redis.call('SET', KEYS[2], string.format('%d', token))
return token
"""
)

# ``jobs status``: the run's hash (KEYS[1]), its in-flight and held counts (KEYS[2], KEYS[3]), whether it is being
# submitted (KEYS[4]), and each tier's stream length and pending count (KEYS[5...], group ARGV[1]; 0 for a stream
# or group missing) from one moment: a job finishing between two reads would look lost. A script, not MULTI: Redis
# at its maxmemory refuses every command queued in a MULTI, and the status of a full queue was a traceback.
STATUS = """
local function count(reply)
  if type(reply) == 'table' then
    if reply.err then return 0 end
    return reply[1]
  end
  return reply
end
local out = {redis.call('HGETALL', KEYS[1]), redis.call('HLEN', KEYS[2]), redis.call('LLEN', KEYS[3]),
  redis.call('EXISTS', KEYS[4])}
for i = 5, #KEYS do
  table.insert(out, count(redis.pcall('XLEN', KEYS[i])))
  table.insert(out, count(redis.pcall('XPENDING', KEYS[i], ARGV[1])))
end
return out
"""

# ``jobs cancel``: 0 when the run is gone; else cancelled, its held jobs dropped.
CANCEL = (
    _RUN_GONE
    + """
if run_gone(KEYS[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
)

# ``jobs retry-dead``, one dead letter (ARGV[1]) back on its stream (KEYS[2]) as ARGV[2], its segment (ARGV[3]) no
# longer in the run's dead set (KEYS[4]): 0 when the run is gone
# or the letter was taken already (by another retry-dead), else 1. A letter whose segment another copy loaded
# since (in the done set, KEYS[5]; ``_FINISH`` uncounted it) is only removed, 0. -1, nothing changed, when the
# run's requeue lock (KEYS[6]) is no longer this retry-dead's (token ARGV[4]; ``_FENCED``; a deleted run's went
# with it: 0 then). The job is waited for anew (KEYS[7], ``target_down``): judged by the wait before, with the
# target still down, it spent its attempts at once.
REVIVE = (
    _RUN_GONE
    + _FENCED
    + """
if run_gone(KEYS[3]) then return 0 end
if lock_lost(KEYS[6], ARGV[4]) then return -1 end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SISMEMBER', KEYS[5], ARGV[3]) == 1 then return 0 end
redis.call('SREM', KEYS[4], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
redis.call('HINCRBY', KEYS[3], 'dead', -1)
redis.call('HSET', KEYS[3], 'state', 'queued')
redis.call('DEL', KEYS[7])
return 1
"""
)

# ``jobs requeue``: lost jobs (ARGV after the first: segment, payload, ...) back on their stream (KEYS[3]), each
# unless its segment is done meanwhile (KEYS[2]); -1, adding none, unless the run is queued and its submit is over
# (KEYS[4]); else -2, adding none, when the run's requeue lock (KEYS[5]) is no longer this requeue's (token ARGV[1]).
REQUEUE = (
    _RUN_GONE
    + _FENCED
    + """
if run_gone(KEYS[1]) or redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return -1 end
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
if lock_lost(KEYS[5], ARGV[1]) then return -2 end
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    redis.call('XADD', KEYS[3], '*', 'job', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""
)

# ``jobs retry-dead`` of a run whose features failed: due again with fresh attempts; 0 when the run is gone or
# its features did not fail; -1 when the run's requeue lock (KEYS[3]) is no longer this one's (token ARGV[2]).
# Waited for anew, as ``REVIVE``'s jobs (KEYS[4]).
REVIVE_FEATURES = (
    _RUN_GONE
    + _FENCED
    + """
if run_gone(KEYS[1]) or redis.call('HEXISTS', KEYS[1], 'error') == 0 then return 0 end
if lock_lost(KEYS[3], ARGV[2]) then return -1 end
redis.call('HDEL', KEYS[1], 'error', 'features_attempts')
redis.call('HSET', KEYS[1], 'state', 'loaded')
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""
)

# States in which a run still has work out (jobs in a stream, held, retrying, or its features due): deleting it
# takes --force. Finished: complete, incomplete (every job loaded or dead), cancelled.
RUNNING_STATES = ("queued", "held", "loaded")

# Remove runs' own keys in one step: their hash and sets and their ids in the indexes. A run whose state says it
# is running is left, and named, unless ARGV[1] is '1'. Their jobs still in a stream, dead letters and waiting
# retries go after, in chunks (``runs.delete_runs``): one script scanning every stream and retry blocked Redis for
# as long as the whole queue took (past 5 s every worker got BUSY), and a malformed payload stopped it halfway.
# From here on a worker on one of their jobs finds the run gone (``run_gone``) and only acknowledges it, and
# nothing retries or dead-letters a job of theirs again. Each deleted run enters the ``deleting`` set in the same
# step and leaves it once its entries are gone: a process killed in between leaves it there for the next one.
# ARGV: force, prefix, running states (comma-separated), run ids...; returns {deleted ids, refused ids, states of
# the refused}.
DELETE_RUNS = """
local force, prefix = ARGV[1] == '1', ARGV[2]
local running = {}
for state in string.gmatch(ARGV[3], '[^,]+') do running[state] = true end
local deleted, refused, states = {}, {}, {}
for i = 4, #ARGV do
  local run = ARGV[i]
  local key = prefix .. 'run:' .. run
  local state = redis.call('HGET', key, 'state')
  if not force and state and running[state] then
    table.insert(refused, run)
    table.insert(states, state)
  else
    table.insert(deleted, run)
    local spec = redis.call('HGET', key, 'spec')
    local fenced = redis.call('EXISTS', key .. ':features-fence') == 1
    -- DEL before HSET: Redis at its maxmemory refuses a script's first write that grows memory (HSET), and a
    -- prune, the way to make room, failed there
    redis.call('DEL', key, key .. ':done', key .. ':inflight', key .. ':held', key .. ':features-lock',
      key .. ':submitting', key .. ':jobs', key .. ':requeue-lock',
      key .. ':dead-segs', key .. ':features-fence', key .. ':target-down')
    if spec and fenced then
      redis.call('HSET', prefix .. 'fences-due', run, spec)
    end
    redis.call('ZREM', prefix .. 'runs', run)
    redis.call('SREM', prefix .. 'held', run)
    redis.call('SREM', prefix .. 'features-due', run)
    redis.call('SADD', prefix .. 'deleting', run)
  end
end
return {deleted, refused, states}
"""


# An entry of a jobs stream that is not a job (written by hand, by another program): acknowledged, off the stream,
# and kept in the dead-letter stream under no run. Left there, it raised in every worker that read or reclaimed
# it, whose thread died, each in turn. KEYS: the stream, the dead-letter stream; ARGV: group, id, payload, error.
_NOT_A_JOB = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'run', '', 'job', ARGV[3], 'error', ARGV[4], 'attempts', 0)
return 1
"""


class JobQueue:
    """The operations a worker performs on the streams of one namespace (``ns``), and on no other's; each is one
    round trip. ``say`` hears a line for each entry set aside as not a job."""

    def __init__(
        self, client: redis.Redis, say: Callable[[str], None] | None = None, ns: Namespace = DEFAULT
    ) -> None:
        self.client, self.ns = client, ns
        self._say = say
        self._not_a_job = client.register_script(_NOT_A_JOB)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._retry = client.register_script(_RETRY)
        self._dead = client.register_script(_DEAD)
        self._drop = client.register_script(_DROP)
        self._promote = client.register_script(_PROMOTE)
        self._release = client.register_script(_RELEASE)
        self._complete = client.register_script(_COMPLETE)
        self._features_failed = client.register_script(_FEATURES_FAILED)
        self._features_fence = client.register_script(_FEATURES_FENCE)
        self._features_backoff = client.register_script(_FEATURES_BACKOFF)
        self._credit = dict.fromkeys(TIERS, 0)

    # -- taking jobs ----------------------------------------------------------------------------------------

    def _tier_order(self) -> list[str]:
        """Smooth weighted round robin: the tier whose turn it is first, then the rest by priority."""
        total = sum(WEIGHTS.values())
        for tier in TIERS:
            self._credit[tier] += WEIGHTS[tier]
        pick = max(TIERS, key=lambda t: self._credit[t])
        self._credit[pick] -= total
        return [pick, *(t for t in TIERS if t != pick)]

    def read(self, consumer: str, block_ms: int, count: int = 1) -> list[Delivery]:
        """Up to ``count`` new jobs from the tier whose turn it is, else from the next non-empty tier; blocks
        when every stream is empty."""
        for tier in self._tier_order():
            got = self.client.xreadgroup(GROUP, consumer, {self.ns.stream(tier): ">"}, count=count)
            if got:
                return self._deliveries(got)
        if block_ms <= 0:
            return []
        got = self.client.xreadgroup(
            GROUP, consumer, {self.ns.stream(t): ">" for t in TIERS}, count=1, block=block_ms
        )
        return self._deliveries(got) if got else []

    def _deliveries(self, got: Any) -> list[Delivery]:
        out = []
        for stream, entries in got:
            for mid, fields in entries:
                delivery = self._parsed(stream, mid, fields)
                if delivery is not None:
                    out.append(delivery)
        return out

    def _parsed(self, stream: bytes | str, mid: bytes | str, fields: dict[bytes, bytes]) -> Delivery | None:
        """The entry's job, or None once an entry that is not one is set aside (``_NOT_A_JOB``)."""
        try:
            return Delivery.parse(stream, mid, fields)
        except ValueError as exc:
            payload = fields.get(b"job", repr(fields).encode())
            error = f"not a job: {exc}"
            self._not_a_job(keys=[text(stream), self.ns.dead], args=[GROUP, text(mid), payload, error])
            if self._say is not None:
                self._say(f"stream entry {text(stream)} {text(mid)} set aside in {self.ns.dead}: {error}")
            return None

    def reclaim(self, consumer: str, min_idle_ms: int) -> list[tuple[Delivery, int]]:
        """Take over one job per tier whose consumer went quiet (died) for ``min_idle_ms``; with its delivery
        count, so a job that keeps killing workers can be dead-lettered."""
        out: list[tuple[Delivery, int]] = []
        for tier in TIERS:
            reply = self.client.xautoclaim(self.ns.stream(tier), GROUP, consumer, min_idle_ms, "0-0", count=1)
            for mid, fields in reply[1]:
                if fields is None:  # deleted while pending (Redis < 7 reports these)
                    continue
                delivery = self._parsed(self.ns.stream(tier), mid, fields)
                if delivery is None:
                    continue
                info = self.client.xpending_range(self.ns.stream(tier), GROUP, mid, mid, 1)
                out.append((delivery, int(info[0]["times_delivered"]) if info else 1))
        return out

    def extend(self, deliveries: Sequence[Delivery], consumer: str) -> None:
        """Reset the jobs' idle time so no one reclaims them while this worker is still on them (JUSTID: the
        delivery count stays)."""
        pipe = self.client.pipeline(transaction=False)
        for d in deliveries:
            pipe.xclaim(self.ns.stream(d.tier), GROUP, consumer, 0, [d.message_id], justid=True)
        pipe.execute()

    def started(self, delivery: Delivery, consumer: str, now: float) -> str | None:
        """Record the job as in flight; returns the run's state, None when the run is gone (the jobs of a
        cancelled or gone run are dropped)."""
        run = delivery.job["run"]
        state = self._start(
            keys=[self.ns.run(run), self.ns.run(run, "inflight")], args=[delivery.message_id, consumer, now]
        )
        return text(state) if state else None

    # -- settling jobs --------------------------------------------------------------------------------------

    def finish(self, delivery: Delivery, rows: int, loaded: bool, now: float) -> bool:
        """Acknowledge after the commit and count the segment once; True when it was the run's last."""
        run = delivery.job["run"]
        result = self._finish(
            keys=[
                self.ns.stream(delivery.tier),
                self.ns.run(run),
                self.ns.run(run, "done"),
                self.ns.run(run, "inflight"),
                self.ns.features_due,
                self.ns.run(run, "dead-segs"),
                record_key(self.ns, run),
            ],
            args=[GROUP, delivery.message_id, delivery.job["seg"], rows, int(loaded), now, run],
        )
        return int(result) == 2

    def retry_later(self, delivery: Delivery, due: float, *, failed: bool = True) -> None:
        """Acknowledge the job and put it back on its stream at ``due``; ``failed=False`` hands back a job
        this worker never started (it is stopping) without spending an attempt."""
        job = {**delivery.job, "attempt": int(delivery.job.get("attempt", 0)) + int(failed)}
        run = job["run"]
        self._retry(
            keys=[
                self.ns.stream(delivery.tier),
                self.ns.run(run),
                self.ns.retry,
                self.ns.run(run, "inflight"),
                self.ns.run(run, "done"),
            ],
            args=[GROUP, delivery.message_id, json.dumps(job, sort_keys=True), due, "", "", job["seg"]],
        )

    def dead_letter(self, delivery: Delivery, error: str, attempts: int) -> None:
        run = delivery.job["run"]
        self._dead(
            keys=[
                self.ns.stream(delivery.tier),
                self.ns.run(run),
                self.ns.dead,
                self.ns.run(run, "inflight"),
                self.ns.run(run, "done"),
                self.ns.run(run, "dead-segs"),
            ],
            args=[
                GROUP,
                delivery.message_id,
                run,
                json.dumps(delivery.job, sort_keys=True),
                error,
                attempts,
                delivery.job["seg"],
            ],
        )

    def complete(self, run: str, features: str, snapshot: str, token: bytes) -> bool:
        """Mark a run complete with its features' counts, and no longer due; False, nothing written, when its
        features lock no longer holds ``token`` (this worker's: it was held up past the lock, another may hold it)."""
        keys = [
            self.ns.run(run),
            self.ns.features_due,
            self.ns.run(run, "features-lock"),
            record_key(self.ns, run),
        ]
        return int(self._complete(keys=keys, args=[run, features, snapshot, token])) >= 0

    def features_failed(self, run: str, limit: int, error: str, token: bytes) -> int:
        """Count a failed features attempt; past ``limit`` the run ends incomplete with ``error``. Returns the
        attempt, or -1 when the run is gone (no longer due; nothing of it made again), -2 (nothing counted) when
        its features lock is another worker's (expired: when the run is no longer due)."""
        keys = [
            self.ns.run(run),
            self.ns.features_due,
            self.ns.run(run, "features-lock"),
            record_key(self.ns, run),
        ]
        return int(self._features_failed(keys=keys, args=[run, limit, error, token]))

    def features_backoff(self, run: str, token: bytes, seconds: float) -> bool:
        """Hand the run's features lock (``token``'s, or expired) to a failed attempt's backoff: no worker takes it
        for ``seconds``, in Redis's own time. False, nothing set, when the lock is another worker's."""
        keys = [self.ns.run(run, "features-lock")]
        return bool(self._features_backoff(keys=keys, args=[token, max(int(seconds * 1000), 1)]))

    def features_fence(self, run: str, token: bytes) -> int:
        """A fencing token for the holder of the run's features lock (``token``): larger than every earlier
        holder's; -1 when the lock no longer holds ``token``, or the run is gone (deleted)."""
        keys = [self.ns.run(run, "features-lock"), self.ns.run(run, "features-fence"), self.ns.run(run)]
        return int(self._features_fence(keys=keys, args=[token]))

    def run_gone(self, run: str) -> bool:
        """Whether the run is gone (``run_spec``: deleted)."""
        return run_spec(self.client, run, self.ns) is None

    def drop(self, delivery: Delivery) -> None:
        """Acknowledge a job of a cancelled run without running it."""
        self._drop(
            keys=[self.ns.stream(delivery.tier), self.ns.run(delivery.job["run"], "inflight")],
            args=[GROUP, delivery.message_id],
        )

    # -- housekeeping ---------------------------------------------------------------------------------------

    def promote_due(self, now: float, limit: int = 1000) -> int:
        return int(self._promote(keys=[self.ns.retry], args=[now, limit, self.ns.prefix]))

    def release_held(self, now: float) -> int:
        """Release every held run whose hold has passed; returns the jobs released."""
        released = 0
        for member in self.client.smembers(self.ns.held):
            run = text(member)
            tier = text(self.client.hget(self.ns.run(run), "priority") or b"normal")
            released += int(
                self._release(
                    keys=[self.ns.run(run, "held"), self.ns.run(run), self.ns.stream(tier), self.ns.held],
                    args=[now, run],
                )
            )
        return released


def enqueue(
    client: redis.Redis,
    tier: str,
    payloads: Sequence[str],
    *,
    chunk: int = 5000,
    alive: tuple[str, int] | None = None,
    ns: Namespace = DEFAULT,
) -> list[float]:
    """XADD ``payloads`` to a tier's stream, pipelined by ``chunk``; returns seconds per chunk. ``alive`` (a key,
    seconds) is set to expire that long after each chunk: while it lives, the enqueueing is still going on."""
    timings: list[float] = []
    for start in range(0, len(payloads), chunk):
        began = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        if alive is not None:
            pipe.set(alive[0], 1, ex=alive[1])
        for payload in payloads[start : start + chunk]:
            pipe.xadd(ns.stream(tier), {"job": payload})
        pipe.execute()
        timings.append(time.perf_counter() - began)
    return timings


class Every:
    """Calls ``beat`` every ``every`` seconds on a thread while a block runs (Redis errors are left to the next
    beat): extends a job's claim so a long job is not reclaimed from a live worker, or renews a lock."""

    def __init__(self, beat: Callable[[], object], every: float) -> None:
        self.beat, self.every = beat, max(every, 0.05)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Every:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            with suppress(redis.RedisError, redis.exceptions.LockError):
                self.beat()


@contextmanager
def held_lock(lock: redis.lock.Lock, every: float) -> Iterator[None]:
    """Keeps an acquired redis-py lock alive while a block runs, and releases it after (only if still ours)."""
    try:
        with Every(lock.reacquire, every):
            yield
    finally:
        with suppress(redis.RedisError, redis.exceptions.LockError):
            lock.release()


__all__ = [
    "CANCEL",
    "DEAD",
    "DELETE_RUNS",
    "DELETING",
    "FEATURES_DUE",
    "FENCES_DUE",
    "GROUP",
    "HELD",
    "PREFIX",
    "REQUEUE",
    "RETRY",
    "REVIVE",
    "REVIVE_FEATURES",
    "RUNNING_STATES",
    "RUNS",
    "STATUS",
    "TIERS",
    "WEIGHTS",
    "Delivery",
    "Every",
    "JobQueue",
    "connect",
    "enqueue",
    "ensure_groups",
    "features_fence_name",
    "held_lock",
    "no_such_run",
    "open_queue",
    "out_of_memory",
    "public_url",
    "redis_time",
    "require_run",
    "run_key",
    "run_spec",
    "stream_key",
    "text",
    "unreachable",
    "wait_for_queue",
]
