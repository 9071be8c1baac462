"""``refresher worker``: pull segment jobs from Redis, run them, acknowledge after the database commit.

At-least-once delivery, exactly-once effect: a job is acknowledged only after its transaction committed, so a
worker that dies in between leaves the job pending; whoever runs it again finds the ledger row already holding
that content hash and changes nothing (``refresher.jobs.segment.load_table``). A job whose worker went quiet for
the visibility timeout is reclaimed (XAUTOCLAIM) by a live worker; a live worker on a long job extends its claim
every third of the timeout so it is not taken from under it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import redis

from featurestore import FeatureStore
from refresher import load, pool, snapshot
from refresher._gc import fewer_collections
from refresher.dsn import served_here
from refresher.engines.base import ServerInfo
from refresher.errors import LoadError, ProfileBusy, SourceError, one_line
from refresher.features import FeatureCounts, refresh_features
from refresher.fence import Fence, FenceLost, drop_fences
from refresher.jobs.inprocess import STORE_BATCH
from refresher.jobs.namespace import namespace_of
from refresher.jobs.queue import (
    TIERS,
    Delivery,
    Every,
    JobQueue,
    connect,
    ensure_groups,
    features_fence_name,
    held_lock,
    redis_time,
    require_run,
    text,
)
from refresher.jobs.retry import backoff_seconds, is_refused, is_transient
from refresher.jobs.segment import (
    SegmentJob,
    SegmentOutcome,
    fetch_tables,
    load_produced,
    produce_tables,
    run_segment_job,
)
from refresher.jobs.target_down import CONNECT, SESSION, found_down, target_answers
from refresher.plan import segment_key
from refresher.profile import Profile, load_profile
from refresher.profile_lock import hold_profile
from refresher.refresh import DailyTables, compute_plan, exchange_timezones
from refresher.segments import Segment
from refresher.settings import Settings
from refresher.snapshot import StoppedWaiting
from refresher.sources import make_source
from refresher.sources.base import Source

Clock = Callable[[], float]

# The least time, in seconds, a worker's session may idle inside a transaction before the server ends it (and the
# session): a live worker's Python between two statements, on a loaded machine, stays well below.
IDLE_IN_TRANSACTION_MIN = 30.0
# Seconds between two of a worker's lines that Redis is out of memory.
FULL_SAY_EVERY = 60.0


@dataclass(frozen=True)
class WorkerOptions:
    name: str
    concurrency: int = 1
    burst: bool = False
    visibility_timeout: float = 60.0
    # Attempts before a job goes to the dead-letter stream: transient failures, permanent ones, and
    # deliveries that never finished (the worker died on it each time).
    max_attempts: int = 6
    poison_attempts: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    block_ms: int = 1000
    # Jobs taken per read and produced together: the store records a batch in one manifest transaction.
    batch: int = 16
    # Seconds a run's target may refuse or drop this worker's connections before its jobs spend attempts on it: a
    # restart or failover is waited for; a wrong port or a server gone for good ends in dead letters, not a hang.
    target_down_wait: float = 300.0


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    name: str
    done: int = 0
    loaded: int = 0
    rows_loaded: int = 0
    retried: int = 0
    dead: int = 0
    features: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "lock"}


def parse_segment(text: str) -> Segment:
    symbol, timeframe, month = text.split("/")
    return Segment(symbol, timeframe, dt.date.fromisoformat(f"{month}-01"))  # type: ignore[arg-type]


class _LockLost(TimeoutError):
    """A run's features lock is no longer this worker's: it was held up past its expiry (its renewal late), another
    may hold it. Transient: counted as a failed attempt when no other worker holds the lock."""


class _TargetDown(LoadError):
    """A run's target did not answer a worker's connection (refused, reset, timed out; not a refusal of its
    credentials): a server restarting, a failover. Waited for, no job's attempt spent."""


class _NoSourceData(SourceError):
    """A run's source has nothing for any of its segments on this worker's machine (``Source.preflight``: a files
    source's directory empty or wrong): every job of the run meets it, each is dead-lettered at once with its line;
    fix the source (or the worker's machine), then `jobs retry-dead`."""


class _RunContext:
    """A run's profile, source, store and target connection, opened once per worker thread."""

    def __init__(
        self,
        settings: Settings,
        spec: dict[str, Any],
        stop: threading.Event | None = None,
        idle_in_transaction: float = IDLE_IN_TRANSACTION_MIN,
        servers: _OwnServers | None = None,
    ) -> None:
        path = Path(spec["profile_path"])
        as_of = dt.date.fromisoformat(spec["as_of"])
        # The submitter's file when this machine has it, else the profile of that name here.
        name = str(path) if path.is_file() else spec["profile"]
        self.spec = spec
        self.profile: Profile = load_profile(name, settings.profiles_dirs, as_of=as_of)
        self.store = FeatureStore(settings.store_root)
        self.source: Source = make_source(self.profile)
        try:
            # A files source no file matches on this machine (its directory empty or wrong): the one line a refresh
            # gives. Unchecked, each job loaded its segment empty, a note nobody read, and the run read complete.
            self.source.preflight()
        except SourceError as exc:
            self.source.close()
            raise _NoSourceData(exc.message, **exc.fields) from exc
        # The profile's own server, served here: a reset killed with the database's door shut left it refusing
        # sessions (the worker retried until its jobs went dead), and the one door opens it; else the target as
        # given, its password from libpq's own sources (PGPASSWORD, .pgpass, service files).
        # A live reset's door is waited for (``snapshot.DOOR_WAIT_SECONDS``), ``stop`` (SIGTERM) ending the wait.
        # Another machine's shut door fails the attempt at once, transient: waited for, it held the worker 30 s
        # an attempt (each job of the batch alone again), and the queue's backoff tries again all the same.
        servers = servers or _OwnServers(settings, ttl=0.0)
        try:
            self.conn = servers.connect(spec, stop=stop, foreign_wait=False, autocommit=True)
            # A worker stopped inside a transaction (SIGSTOP, a suspended machine) kept its locks for as long as
            # it stayed stopped: another worker's first features load waited on the schema lock for ever. The
            # server ends such a transaction (and the session) once it idles ``idle_in_transaction`` seconds.
            self.conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (f"{idle_in_transaction * 1000:.0f}ms",),
            )
        except psycopg.OperationalError as exc:
            # libpq's line names neither the database nor the role: the DSN does, without its password.
            self.source.close()
            down = is_transient(exc) and not is_refused(exc) and not isinstance(exc, snapshot.ForeignDoorShut)
            failed = _TargetDown if down else LoadError
            raise failed(f"target {spec['target']}: cannot connect ({one_line(exc)})") from exc
        except BaseException:
            self.source.close()
            raise

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()
        with suppress(Exception):
            self.source.close()


def _own_server(settings: Settings, spec: dict[str, Any]) -> ServerInfo | None:
    """The run's target when it is the profile's own server and this machine serves it (submitted with or
    without ``--target``: ``served_here``), else None."""
    return served_here(settings, spec["profile"], str(spec["target"]))


# Seconds a worker trusts what it found out about a run's target (``_OwnServers``) without asking again.
OWN_SERVER_TTL = 60.0


class _OwnServers:
    """``_own_server`` of each (profile, target), kept by a worker process for ``ttl`` seconds and shared by its
    threads. Under engine docker or auto each look is a Docker daemon call (is the container running, on what
    host port), and a worker made one for every connection to a run's target: each run, each thread, each
    reconnect after a failed job.

    A server stopped or made again meanwhile (``refresher down``/``up``: another host port, another password)
    fails the connection made from what was kept: the target is then looked at again at once, and connected to
    again when that changed what was found. So a kept answer is used past such a change for no more than one
    failed connection, and for at most ``ttl`` when it still connects (it found no server here, and libpq's own
    credentials reach the target: until then a reset's door there is waited for, not opened)."""

    def __init__(self, settings: Settings, ttl: float = OWN_SERVER_TTL) -> None:
        self.settings, self.ttl = settings, ttl
        self._known: dict[tuple[str, str], tuple[float, ServerInfo | None]] = {}
        self._lock = threading.Lock()

    def get(self, spec: dict[str, Any], *, fresh: bool = False) -> ServerInfo | None:
        """The run's own server (as ``_own_server``); ``fresh``: looked at now, whatever was kept."""
        return self._look(spec, fresh)[0]

    def connect(self, spec: dict[str, Any], **kwargs: Any) -> psycopg.Connection[Any]:
        """``snapshot.connect_target`` to the run's target; a failed connection from a kept answer looks again."""
        server, kept = self._look(spec, fresh=False)
        if not kept:
            return snapshot.connect_target(server, str(spec["target"]), **kwargs)
        try:
            return snapshot.connect_target(server, str(spec["target"]), **kwargs)
        except psycopg.OperationalError:
            now = self.get(spec, fresh=True)
            if now == server:  # the same server: the failure is the server's, not what was kept
                raise
        return snapshot.connect_target(now, str(spec["target"]), **kwargs)

    def _look(self, spec: dict[str, Any], fresh: bool) -> tuple[ServerInfo | None, bool]:
        """The run's own server, and whether it is a kept answer (not looked at now)."""
        key = (str(spec["profile"]), str(spec["target"]))
        with self._lock:
            known = self._known.get(key)
        if known is not None and not fresh and time.monotonic() - known[0] < self.ttl:
            return known[1], True
        server = _own_server(self.settings, spec)
        with self._lock:
            self._known[key] = (time.monotonic(), server)
        return server, False


def run_features(
    conn: psycopg.Connection[Any],
    profile: Profile,
    store: FeatureStore,
    source: Source,
    *,
    prune: bool = False,
    fence: Fence | None = None,
) -> FeatureCounts:
    """The end of a queue run, as ``refresh`` ends: with ``prune`` the stale segments go, then the features;
    each of those writes only while ``fence`` (the run's, claimed by this worker) is still this worker's.

    Features read their input segments from this worker's store, which may lack some: a worker on another
    machine with its own store loaded them, or a file was found missing. Those are produced from the source
    here and stored, so the features step never asks the store for a key it does not hold.
    """
    plan = compute_plan(profile, source, store, conn)
    tz_of = exchange_timezones(profile)
    if prune:
        for segment in plan.stale:
            load.delete_segment(conn, segment, tz=tz_of.get(segment.symbol, "UTC"), fence=fence)
    read = {use.spec.timeframe for use in profile.features}
    jobs = [SegmentJob(s, plan.keys[s], tz_of[s.symbol]) for s in plan.to_fetch if s.timeframe in read]
    fetched: dict[Segment, pa.Table] = {}
    for start in range(0, len(jobs), STORE_BATCH):
        batch = jobs[start : start + STORE_BATCH]
        for job, (table, _hash) in zip(batch, fetch_tables(batch, source, store), strict=True):
            source.rejects.pop(job.segment, None)  # not loaded here: the segment job loaded it
            if job.segment.timeframe == "1d":
                fetched[job.segment] = table
    daily = DailyTables(fetched, plan, store, source)
    return refresh_features(conn, profile, store, plan, daily, prune=prune, fence=fence)


class RedisClock:
    """Redis's own time, as this machine's clock plus the offset measured at most once per ``interval``: the one
    clock every worker schedules by (retries, held runs, counters), whatever its machine's clock says. A worker
    whose clock ran an hour ahead released a ``--when-closed`` run an hour early, while the exchange traded, and
    promoted every retry at once; one behind left the retries it scheduled waiting an hour for the others.

    One per worker process, shared by its threads: the offset drifts by milliseconds an hour, so each thread's
    sweep asking TIME twice a second was a round trip for nothing."""

    def __init__(self, local: Clock = time.time, interval: float = 30.0) -> None:
        self.local, self.offset, self.interval = local, 0.0, interval
        self._synced = -math.inf  # time.monotonic() of the last measure
        self._lock = threading.Lock()

    def sync(self, client: redis.Redis) -> None:
        with self._lock:
            if time.monotonic() - self._synced < self.interval:
                return
            before = self.local()
            self.offset = redis_time(client) - (before + self.local()) / 2
            self._synced = time.monotonic()

    def __call__(self) -> float:
        return self.local() + self.offset


class Worker:
    """Runs ``options.concurrency`` consumer loops (threads) until stopped, or until idle with ``burst``."""

    def __init__(
        self,
        queue_url: str,
        settings: Settings,
        options: WorkerOptions,
        *,
        clock: Clock | None = None,
        stop: threading.Event | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.queue_url, self.settings, self.options = queue_url, settings, options
        # One client for every thread (its pool gives each a connection): the CLI's, which asked Redis already.
        self.client = client if client is not None else connect(queue_url)
        # The one namespace whose jobs this worker takes (the URL's): another's are not in its streams.
        self.ns = namespace_of(queue_url)
        self.clock: Clock = clock or RedisClock()  # an injected clock (--now) is taken as it is
        self.stop = stop or threading.Event()
        self.report = WorkerReport(options.name)
        self._rng = random.Random()
        self._servers = _OwnServers(settings)
        self._full_said, self._full_lock = -math.inf, threading.Lock()
        # What ended a consumer thread that was not meant to end (a bug, a Redis refusing us for good: READONLY from
        # a replica); the worker then stops, and exits 1. Left alone, the process exited 0 with its traceback, or
        # ran on with fewer threads: a service manager restarting a worker that fails saw none fail.
        self.failure: BaseException | None = None

    def run(self) -> WorkerReport:
        threads = [
            threading.Thread(target=self._loop, args=(f"{self.options.name}-{i}",), daemon=True)
            for i in range(self.options.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
        return self.report

    # -- the loop -------------------------------------------------------------------------------------------

    def _loop(self, consumer: str) -> None:
        queue = JobQueue(self.client, say=self._say, ns=self.ns)
        contexts: dict[str, _RunContext] = {}
        failures = 0
        last_sweep = 0.0
        groups = False
        try:
            while not self.stop.is_set():
                try:
                    if not groups:
                        # A worker may start before any run was submitted, or find a group deleted by hand
                        # (or its stream): made again from the stream's first entry, whatever is left in it
                        # runs (a redelivered job is a no-op by the ledger).
                        ensure_groups(queue.client, queue.ns)
                        groups = True
                    if time.monotonic() - last_sweep > 0.5:
                        self._housekeeping(queue, contexts)
                        last_sweep = time.monotonic()
                    reclaimed = queue.reclaim(consumer, int(self.options.visibility_timeout * 1000))
                    for delivery, delivered in reclaimed:
                        self._handle(queue, consumer, [delivery], contexts, delivered=delivered)
                    block = 0 if (self.options.burst or reclaimed) else self.options.block_ms
                    work = queue.read(consumer, block, count=self.options.batch)
                    if work:
                        self._handle(queue, consumer, work, contexts)
                    elif not reclaimed:
                        if self.options.burst and self._drained(queue):
                            return
                        if self.options.burst:
                            self.stop.wait(0.2)
                        continue
                    failures = 0
                except redis.OutOfMemoryError as exc:  # a ResponseError: before that clause, which raises
                    self._full(exc)
                    failures += 1
                    self.stop.wait(backoff_seconds(failures, base=0.1, cap=5.0, rng=self._rng))
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    # Redis is restarting: wait with capped, jittered backoff and carry on; nothing is lost,
                    # an unacknowledged job stays pending and is reclaimed after the visibility timeout.
                    failures += 1
                    self.stop.wait(backoff_seconds(failures, base=0.1, cap=5.0, rng=self._rng))
                except redis.ResponseError as exc:
                    if str(exc).startswith("BUSY "):  # another client's long script: it killed this thread
                        failures += 1
                        self.stop.wait(backoff_seconds(failures, base=0.1, cap=5.0, rng=self._rng))
                    elif "NOGROUP" in str(exc):
                        groups = False
                    else:
                        raise
        except BaseException as exc:
            self.failure = self.failure or exc
            self.stop.set()  # the other threads finish the job in hand and hand their batch back
            raise  # its traceback, on stderr
        finally:
            for ctx in contexts.values():
                ctx.close()

    def _drained(self, queue: JobQueue) -> bool:
        pipe = queue.client.pipeline(transaction=False)
        for tier in TIERS:
            pipe.xlen(queue.ns.stream(tier))
        pipe.zcard(queue.ns.retry)
        pipe.scard(queue.ns.features_due)
        return not any(int(n) for n in pipe.execute())

    def _context(self, queue: JobQueue, contexts: dict[str, _RunContext], run: str) -> _RunContext:
        if run not in contexts:
            # Idle twice the visibility timeout inside a transaction, a worker is held up past its jobs' and
            # features lock's life (another took them over), never less than IDLE_IN_TRANSACTION_MIN.
            idle = max(2 * self.options.visibility_timeout, IDLE_IN_TRANSACTION_MIN)
            spec = require_run(queue.client, run, queue.ns)
            contexts[run] = _RunContext(self.settings, spec, self.stop, idle, self._servers)
            target_answers(queue.client, queue.ns, run)  # down again, it is waited for from the start
        return contexts[run]

    def _handle(
        self,
        queue: JobQueue,
        consumer: str,
        deliveries: list[Delivery],
        contexts: dict[str, _RunContext],
        *,
        delivered: int = 1,
    ) -> None:
        """Run a batch of jobs: their tables are produced together (one store transaction for the batch, as
        in-process), then each loads in its own transaction and is acknowledged on its own.

        With the cyclic collector held back, as a refresh holds it (``refresher._gc``), and given back when the
        batch ends, whatever way: a worker runs for hours, and between batches it collects as usual. Nothing is
        frozen: with ``--concurrency`` above 1 the batches of the threads overlap, so a freeze could last for
        hours and keep whatever garbage the worker had when it began."""
        with fewer_collections(freeze=False):
            self._handle_batch(queue, consumer, deliveries, contexts, delivered=delivered)

    def _handle_batch(
        self,
        queue: JobQueue,
        consumer: str,
        deliveries: list[Delivery],
        contexts: dict[str, _RunContext],
        *,
        delivered: int,
    ) -> None:
        if delivered > self.options.max_attempts:
            for delivery in deliveries:
                queue.dead_letter(delivery, f"delivered {delivered} times without finishing", delivered)
                self._count(dead=1)
            return
        live = []
        for delivery in deliveries:
            if queue.started(delivery, consumer, self.clock()) in ("cancelled", None):
                queue.drop(delivery)
            else:
                live.append(delivery)
        by_run: dict[str, list[Delivery]] = {}
        for delivery in live:
            by_run.setdefault(delivery.job["run"], []).append(delivery)
        every = self.options.visibility_timeout / 3
        for run, group in by_run.items():
            with Every(partial(queue.extend, group, consumer), every):
                self._handle_run(queue, group, contexts, run)

    def _handle_run(
        self, queue: JobQueue, group: list[Delivery], contexts: dict[str, _RunContext], run: str
    ) -> None:
        try:
            ctx = self._context(queue, contexts, run)
        except StoppedWaiting:  # SIGTERM while a reset's door kept the target shut
            for delivery in group:
                self._hand_back(queue, delivery)
            return
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except _TargetDown as exc:
            if self._target_down(queue, group, run, exc):
                return
            for delivery in group:
                self._failed(queue, delivery, exc)
            return
        except Exception as exc:
            # The run's target, profile or source, not any one job: each job alone met it again (and waited
            # out a reset's door again, DOOR_WAIT_SECONDS each); every job is settled with it.
            for delivery in group:
                self._failed(queue, delivery, exc)
            return
        try:
            produced = produce_tables([self._job(ctx, d) for d in group], ctx.source, ctx.store)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as exc:
            if is_refused(exc):
                # The target (or upstream) refused us: each job alone logged in again, one refusal per
                # job; the refusal is every job's, each settled with it (dead-lettered at once).
                for delivery in group:
                    self._failed(queue, delivery, exc)
                return
            # Which job failed? Run each alone, so the error lands on that job only.
            for delivery in group:
                alone = partial(self._run_alone, contexts, queue, delivery)
                self._settle(queue, delivery, contexts, alone)
            return
        for delivery, (job, table, content_hash) in zip(group, produced, strict=True):
            load = partial(load_produced, ctx.conn, ctx.source, job, table, content_hash)
            self._settle(queue, delivery, contexts, load)

    def _target_down_wait(self, queue: JobQueue, run: str, what: str) -> float | None:
        """Seconds to wait for the run's target, found down again (``what``: ``_TargetDown``, or its features
        session lost), before the next try, without spending an attempt; None once it has been found down for
        ``options.target_down_wait`` (a wrong port, a server gone for good; ``target_down``: since the first
        finding by any worker after the target last answered, or `jobs retry-dead`): then each attempt counts. Each
        a failed attempt, a Postgres restart of 15 s dead-lettered a sixth of a run's jobs (six attempts' backoffs,
        jittered from 0, add up to seconds), or used up its features step's attempts, and the run read `incomplete`
        until `jobs retry-dead`. A target that refuses the worker's credentials is not waited for: dead-lettered at
        once, as before (``_attempts``)."""
        # A finding no worker has added to for this long is an outage over (``found_down``): twice the longest
        # a worker waits before it tries again, or spends attempts meanwhile.
        forgotten_after = 2 * max(self.options.target_down_wait, self.options.backoff_cap)
        times, down_for = found_down(queue.client, queue.ns, run, what, forgotten_after=forgotten_after)
        if down_for >= self.options.target_down_wait:
            return None
        ceiling = min(self.options.backoff_cap, self.options.backoff_base * 2 ** min(times, 64))
        return self._rng.uniform(ceiling / 2, ceiling)  # never near 0: no reconnecting in a tight loop

    def _target_down(self, queue: JobQueue, group: list[Delivery], run: str, exc: _TargetDown) -> bool:
        """The run's target does not answer: its jobs go back, due after ``_target_down_wait``, and this thread
        waits as long before it reads again; False, nothing done, once that wait is over (each attempt counts)."""
        wait = self._target_down_wait(queue, run, CONNECT)
        if wait is None:
            return False
        for delivery in group:
            queue.retry_later(delivery, self.clock() + wait, failed=False)
        self._say(f"run {run}: {one_line(exc)}; {len(group)} job(s) back in {wait:.1f} s, no attempt spent")
        self.stop.wait(wait)
        return True

    def _hand_back(self, queue: JobQueue, delivery: Delivery) -> None:
        """A job this stopping worker (SIGTERM) will not run, back on its stream now without spending an attempt,
        rather than after the visibility timeout."""
        queue.retry_later(delivery, self.clock(), failed=False)

    def _settle(
        self,
        queue: JobQueue,
        delivery: Delivery,
        contexts: dict[str, _RunContext],
        action: Callable[[], SegmentOutcome],
    ) -> None:
        run = delivery.job["run"]
        if self.stop.is_set():
            self._hand_back(queue, delivery)
            return
        try:
            outcome = action()
        except StoppedWaiting:
            self._hand_back(queue, delivery)
            return
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as exc:
            if run in contexts and (is_transient(exc) or contexts[run].conn.closed):
                contexts.pop(run).close()  # reconnect on the next attempt
            self._failed(queue, delivery, exc)
            return
        last = queue.finish(delivery, outcome.rows_loaded, outcome.loaded, self.clock())
        self._count(done=1, loaded=int(outcome.loaded), rows_loaded=outcome.rows_loaded)
        if last:
            self._features(queue, contexts, run)

    @staticmethod
    def _job(ctx: _RunContext, delivery: Delivery) -> SegmentJob:
        segment = parse_segment(delivery.job["seg"])
        # The source may have changed since the plan (a fixed file before `retry-dead`): use its key now.
        key = segment_key(segment, ctx.source.kind, ctx.source.version(segment))
        return SegmentJob(segment, key, delivery.job["tz"], force=bool(delivery.job.get("force")))

    def _run_alone(
        self, contexts: dict[str, _RunContext], queue: JobQueue, delivery: Delivery
    ) -> SegmentOutcome:
        ctx = self._context(queue, contexts, delivery.job["run"])
        return run_segment_job(self._job(ctx, delivery), ctx.source, ctx.store, ctx.conn)

    def _failed(self, queue: JobQueue, delivery: Delivery, exc: BaseException) -> None:
        attempt = int(delivery.job.get("attempt", 0)) + 1
        kind, limit = self._attempts(exc)
        text = one_line(exc)
        if attempt >= limit:
            queue.dead_letter(delivery, f"{kind}: {text}", attempt)
            self._count(dead=1)
            self._say(f"{delivery.job['seg']}: dead-lettered after {attempt} attempt(s): {kind}: {text}")
        else:
            wait = backoff_seconds(
                attempt, base=self.options.backoff_base, cap=self.options.backoff_cap, rng=self._rng
            )
            queue.retry_later(delivery, self.clock() + wait)
            self._count(retried=1)
            self._say(
                f"{delivery.job['seg']}: attempt {attempt} failed ({kind}), retry in {wait:.1f} s: {text}"
            )

    def _attempts(self, exc: BaseException) -> tuple[str, int]:
        """What kind of failure ``exc`` is, and the attempts its job (or features step) gets. A target that
        refuses us (password, role, database) gets one: every attempt in the backoff meets the same refusal; so does
        a source with nothing for the run here (``_NoSourceData``)."""
        if is_refused(exc) or isinstance(exc, _NoSourceData):
            return "permanent", 1
        if is_transient(exc):
            return "transient", self.options.max_attempts
        return "permanent", self.options.poison_attempts

    def _say(self, message: str) -> None:
        """One line on stderr per failed attempt: an operator sees why jobs retry or die without reading Redis."""
        print(f"refresher worker {self.options.name}: {message}", file=sys.stderr, flush=True)

    # -- housekeeping ---------------------------------------------------------------------------------------

    def _housekeeping(self, queue: JobQueue, contexts: dict[str, _RunContext]) -> None:
        if isinstance(self.clock, RedisClock):
            self.clock.sync(queue.client)
        now = self.clock()
        # Each adds to Redis (XADD): Redis at its maxmemory refuses them until there is room, and the worker goes on
        # to its jobs meanwhile, whose finishing (XDEL) makes room. Raised, they kept it from reading any.
        for step in (queue.promote_due, queue.release_held):
            try:
                step(now)
            except redis.OutOfMemoryError as exc:
                self._full(exc)
        for member in queue.client.smembers(queue.ns.features_due):
            self._features(queue, contexts, text(member))

    def _full(self, exc: redis.OutOfMemoryError) -> None:
        """One line on stderr, at most once a minute (a sweep meets it twice a second), that Redis is at its
        maxmemory and refuses what would grow it: retries, held runs and features wait, jobs go on."""
        with self._full_lock:
            if time.monotonic() - self._full_said < FULL_SAY_EVERY:
                return
            self._full_said = time.monotonic()
        self._say(
            f"Redis is out of memory ({one_line(exc)}): jobs go on; retries, held runs and features wait for room "
            "(`refresher jobs prune`, or raise Redis's maxmemory)"
        )

    def _features(self, queue: JobQueue, contexts: dict[str, _RunContext], run: str) -> None:
        """Compute a run's features once all its segments are loaded; one worker does it, under a lock that
        lives one visibility timeout and is renewed while the work goes on: a worker killed here hands the
        task to the next sweep of another within that timeout, a slow live one keeps it.

        The lock is a fence too: a worker held up past it (SIGSTOP, a suspended machine, a long pause; its
        renewal stopped with it) while another took it wrote the run's completion, or counted a failed attempt,
        over the other's when it went on. Each of those writes checks the lock still holds this worker's token,
        in the script that writes (``queue._FENCED``); so does the look before the snapshot. Its writes to the
        target are fenced there (``refresher.fence``): the lock's holder claims the run's fence with a token larger
        than every earlier holder's before its first write, and from then on no write of an earlier one commits.
        """
        try:
            self._features_run(queue, contexts, run)
        except redis.OutOfMemoryError as exc:  # the lock (a new key), or its step's writes: the run stays due
            self._full(exc)

    def _features_run(self, queue: JobQueue, contexts: dict[str, _RunContext], run: str) -> None:
        ttl = self._features_ttl
        lock = queue.client.lock(
            queue.ns.run(run, "features-lock"), timeout=ttl, blocking=False, thread_local=False
        )
        if not lock.acquire():
            return
        lost = f"features not written: this worker was held up past its {ttl:g} s features lock"
        backoff = 0.0
        with held_lock(lock, every=ttl / 3):
            try:
                self._features_locked(queue, contexts, run, lock)
            except (
                StoppedWaiting
            ):  # SIGTERM at a reset's door: the run stays due, for the next worker's sweep
                pass
            except FenceLost:  # a later holder claimed the run's fence in the target: it holds the lock
                self._say(f"run {run}: {lost}, which another worker took")
            except _LockLost:
                # Counted unless another worker holds the lock: a stage outliving its renewal every time (a late
                # renewal thread, a pause) was tried again at once, for ever, uncounted.
                backoff = self._features_failed(queue, contexts, run, _LockLost(lost), lock.local.token)
            except _TargetDown as exc:  # the target restarting: waited for as the run's jobs wait, uncounted
                wait = self._target_down_wait(queue, run, CONNECT)
                if wait is None:
                    backoff = self._features_failed(queue, contexts, run, exc, lock.local.token)
                else:
                    self._say(
                        f"run {run}: features: {one_line(exc)}; retry in {wait:.1f} s, no attempt spent"
                    )
                    backoff = wait
            except (redis.ConnectionError, redis.TimeoutError, redis.OutOfMemoryError):
                raise  # Redis's, not the features': no attempt counted
            except Exception as exc:
                # The target dropped or unreachable, the profile gone from this machine: it killed the worker's
                # thread, and every worker's after it (each sweep tried again), and a --burst worker never
                # drained.
                waited = self._features_lost(queue, contexts, run, exc, lock)
                if waited is None:
                    backoff = self._features_failed(queue, contexts, run, exc, lock.local.token)
                else:
                    backoff = waited
            if backoff:  # the lock becomes the backoff, never free in between; expiring in Redis's own time
                queue.features_backoff(run, lock.local.token, backoff)

    def _features_lost(
        self,
        queue: JobQueue,
        contexts: dict[str, _RunContext],
        run: str,
        exc: Exception,
        lock: redis.lock.Lock,
    ) -> float | None:
        """Seconds to wait, no attempt spent, when ``exc`` is the features step's session to the target lost (the
        worker's connection, kept since the run's jobs, met a target restarted since or during the step), and one
        new connection either finds the target down (``_TargetDown``) or answering again; None (the attempt
        counts) for any other failure, a session lost past ``target_down_wait``, or a new connection refused; None
        too when the features lock is no longer this worker's (held up past it, its session ended by the taker's
        claim of the fence): ``_features_failed`` then says so, uncounted.

        Only ``_TargetDown`` was waited for, raised while a connection is made: the step runs first on the one its
        run's last job used, and a restart between the two spent a features attempt (with --max-attempts 1 the run
        read `incomplete` while the target was up again). A feature's own error leaves the session open: counted.
        Its waits are timed apart from the connections' (``target_down.SESSION``: not ended by a connection made),
        so a step that ends its server's sessions each time it runs (a crash, recovered) spends attempts in the
        end."""
        ctx = contexts.get(run)
        if ctx is None or not ctx.conn.broken or not is_transient(exc) or is_refused(exc):
            return None
        if not lock.owned():
            return None
        contexts.pop(run).close()
        lost = f"session to the target lost ({one_line(exc)})"
        try:
            self._context(queue, contexts, run)
            why = f"{lost}, it answers again"
        except _TargetDown as down:
            why = f"{lost}; {one_line(down)}"
        except StoppedWaiting:  # SIGTERM at a reset's door: the run stays due, for the next worker's sweep
            return 0.0
        except (redis.ConnectionError, redis.TimeoutError, redis.OutOfMemoryError):
            raise
        except Exception:  # refused, the profile gone: the next attempt would meet it, this one counts
            return None
        wait = self._target_down_wait(queue, run, SESSION)
        if wait is not None:
            self._say(f"run {run}: features: {why}; retry in {wait:.1f} s, no attempt spent")
        return wait

    @property
    def _features_ttl(self) -> float:
        """Seconds a run's features lock lives unrenewed; also the longest its holder waits at the run's fence in
        the target for an earlier holder's transaction."""
        return max(self.options.visibility_timeout, 1.0)

    def _features_failed(
        self, queue: JobQueue, contexts: dict[str, _RunContext], run: str, exc: Exception, token: bytes
    ) -> float:
        """Count a failed features attempt on the run (its features lock holding ``token``); returns the backoff
        to wait out before the next, or 0 after the last attempt, which ends the run 'incomplete' with the
        error."""
        if run in contexts:
            contexts.pop(run).close()  # reconnect on the next attempt
        text = one_line(exc)
        kind, limit = self._attempts(exc)
        attempt = queue.features_failed(run, limit, f"features: {kind}: {text}", token)
        if attempt == -2:
            if isinstance(exc, _LockLost):
                self._say(f"run {run}: {text}, which another worker took")
            else:
                self._say(
                    f"run {run}: features attempt not counted: the features lock is another worker's: {text}"
                )
            return 0.0
        if attempt < 0:  # the run was deleted (by hand, `jobs delete --force`)
            self._say(f"run {run}: features not computed, the run is gone from Redis: {text}")
            return 0.0
        if attempt >= limit:
            self._say(
                f"run {run}: features failed after {attempt} attempt(s), run incomplete: {kind}: {text}"
            )
            return 0.0
        wait = backoff_seconds(
            attempt, base=self.options.backoff_base, cap=self.options.backoff_cap, rng=self._rng
        )
        self._say(f"run {run}: features attempt {attempt} failed ({kind}), retry in {wait:.1f} s: {text}")
        return wait

    def _features_locked(
        self, queue: JobQueue, contexts: dict[str, _RunContext], run: str, lock: redis.lock.Lock
    ) -> None:
        ctx = self._context(queue, contexts, run)
        prune = bool(ctx.spec.get("prune"))
        token = queue.features_fence(run, lock.local.token)
        if token < 0:
            raise _LockLost
        fence = Fence(features_fence_name(run), token, wait=self._features_ttl)
        fence.claim(ctx.conn)  # before the first write: from its commit on, no earlier holder's write commits
        if queue.run_gone(run):
            # Deleted (``jobs delete --force``) since its token: the delete dropped the run's fence row after it
            # removed the run's keys, and a claim committed after that drop made the row again, for good, and
            # went on to write a gone run's features. Looked at once the claim committed: a delete after this
            # look finds the row to drop, and the next check of this worker's finds it gone.
            drop_fences(ctx.conn, [fence.name], fence.wait)
            contexts.pop(run).close()
            self._say(
                f"run {run}: features not computed, the run is gone from Redis (deleted as this worker "
                "claimed its fence)"
            )
            return
        counts = run_features(ctx.conn, ctx.profile, ctx.store, ctx.source, prune=prune, fence=fence)
        if not lock.owned():  # held up past the lock: no snapshot (it ends the database's sessions) either
            raise _LockLost
        saved = self._snapshot(contexts, run)
        if not queue.complete(run, json.dumps(vars(counts)), saved, lock.local.token):
            raise _LockLost
        self._count(features=1)

    def _snapshot(self, contexts: dict[str, _RunContext], run: str) -> str:
        """Save the pristine snapshot ``refresher reset`` restores, as a refresh does, when the run loaded the
        profile's own server and this machine serves it (another machine cannot: ``refresh`` saves it there).

        Not while a refresh or reset of the profile runs (it saves or restores one itself): never waits."""
        spec = contexts[run].spec
        # Saving ends the server's sessions: never from a kept answer (``_OwnServers``), looked at now.
        server = self._servers.get(spec, fresh=True)
        if server is None:
            return "not this machine's server"
        # A template copy terminates every session on the database: close ours first, reconnect later.
        contexts.pop(run).close()
        try:
            with hold_profile(self.settings.state_dir, spec["profile"], wait=False):
                if snapshot.is_current(server):
                    return "unchanged"
                snapshot.save_pristine(server, fill_pool=False)
                pool.spawn_refill(server)
                return "saved"
        except ProfileBusy:
            return "skipped: a refresh or reset of the profile is running"

    def _count(self, **deltas: int) -> None:
        with self.report.lock:
            for name, delta in deltas.items():
                setattr(self.report, name, getattr(self.report, name) + delta)


__all__ = ["RedisClock", "Worker", "WorkerOptions", "WorkerReport", "parse_segment"]
