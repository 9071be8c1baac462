"""Runs: a submitted set of segment jobs, its spec and counters in one Redis hash, read in one round trip.

``jobs status`` reads the run hash plus a few lengths, never the jobs themselves, so it answers in
milliseconds whether the run has 10 or 120,000 segments.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psycopg
import redis

from refresher.dsn import served_here
from refresher.errors import JobError, one_line
from refresher.fence import drop_fences
from refresher.jobs.namespace import DEFAULT, Namespace
from refresher.jobs.queue import (
    CANCEL,
    DELETE_RUNS,
    GROUP,
    REQUEUE,
    REVIVE,
    REVIVE_FEATURES,
    RUNNING_STATES,
    STATUS,
    TIERS,
    WEIGHTS,
    enqueue,
    ensure_groups,
    features_fence_name,
    held_lock,
    no_such_run,
    redis_time,
    require_run,
    run_spec,
    text,
)
from refresher.jobs.segment import SegmentJob
from refresher.jobs.target_down import record_key
from refresher.settings import Settings


@dataclass(frozen=True)
class RunSpec:
    """What workers need to run a run's jobs; names the target without its password."""

    profile: str
    profile_path: str
    as_of: str
    target: str
    # The target is the profile's own server: a worker on that machine takes the password from its state dir.
    own_server: bool
    priority: str = "normal"
    when_closed: str | None = None
    held_until: str | None = None
    # ``--prune``: when the run's segments are loaded, its stale segments and their feature rows go too.
    prune: bool = False


def _payload(run_id: str, tier: str, segment: str, key: str, tz: str, force: bool) -> str:
    """A job as it goes in a stream."""
    fields = {"run": run_id, "tier": tier, "seg": segment, "key": key, "tz": tz, "force": force, "attempt": 0}
    return json.dumps(fields, sort_keys=True)


def _job_list(segments: Sequence[str], jobs: Sequence[SegmentJob]) -> bytes:
    """A run's jobs as ``jobs requeue`` needs them, a line each: segment, time zone, force (not the store key,
    which a worker computes from the source, and which made the list 15 times larger). 120,000 jobs: 360 KB,
    and a tenth of the time their payloads take to make."""
    lines = "\n".join([f"{seg}\t{job.tz}\t{int(job.force)}" for seg, job in zip(segments, jobs, strict=True)])
    return zlib.compress(lines.encode(), 1)


def _jobs_of_list(blob: bytes) -> list[tuple[str, str, bool]]:
    """``_job_list`` read back: (segment, time zone, force) per job."""
    lines = zlib.decompress(blob).decode().split("\n")
    return [(seg, tz, force == "1") for seg, tz, force in (line.split("\t") for line in lines if line)]


@dataclass(frozen=True)
class Submitted:
    """``jobs submit``: the run id and how the submission went."""

    run_id: str
    jobs: int
    priority: str
    held_until: str | None
    seconds: float
    # Seconds per pipelined chunk of XADDs, for the benchmark's per-job latencies.
    chunk_seconds: list[float] = field(default_factory=list)
    chunk_size: int = 5000
    namespace: str = DEFAULT.name

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["chunk_seconds"], out["chunk_size"]
        return out


# Seconds a submit may pause between two chunks of its jobs before the run's missing jobs count as lost.
SUBMITTING_TTL = 60


def new_run_id(now: dt.datetime) -> str:
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def submit_jobs(
    client: redis.Redis,
    spec: RunSpec,
    jobs: Sequence[SegmentJob],
    *,
    now: dt.datetime,
    held_until_ts: float | None = None,
    chunk: int = 5000,
    ns: Namespace = DEFAULT,
) -> Submitted:
    """Record the run in namespace ``ns``, then enqueue its jobs (or park them while the run is held)."""
    began = time.perf_counter()
    ensure_groups(client, ns)
    run_id = new_run_id(now)
    segments = [str(job.segment) for job in jobs]
    payloads = [
        _payload(run_id, spec.priority, seg, job.key, job.tz, job.force)
        for seg, job in zip(segments, jobs, strict=True)
    ]
    state = "held" if held_until_ts is not None else ("queued" if payloads else "loaded")
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        ns.run(run_id),
        mapping={
            "spec": json.dumps(asdict(spec), sort_keys=True),
            "priority": spec.priority,
            "total": len(payloads),
            "done": 0,
            "rows": 0,
            "loaded": 0,
            "dead": 0,
            "retrying": 0,
            "state": state,
            "submitted_at": now.timestamp(),
            "held_until_ts": held_until_ts if held_until_ts is not None else 0,
        },
    )
    # While its jobs are being enqueued, fewer in the stream than counted is no loss (``lost``); a submitter
    # killed midway (or Redis losing the last second of its writes) lets the key expire, and the loss shows.
    submitting = (ns.run(run_id, "submitting"), SUBMITTING_TTL)
    pipe.set(submitting[0], 1, ex=submitting[1])
    pipe.zadd(ns.runs, {run_id: now.timestamp()})
    pipe.set(ns.run(run_id, "jobs"), _job_list(segments, jobs))
    if state == "loaded":
        pipe.sadd(ns.features_due, run_id)
    pipe.execute()
    timings: list[float] = []
    try:
        if state == "held":
            for start in range(0, len(payloads), chunk):
                t0 = time.perf_counter()
                client.rpush(ns.run(run_id, "held"), *payloads[start : start + chunk])
                timings.append(time.perf_counter() - t0)
            client.sadd(ns.held, run_id)
        else:
            timings = enqueue(client, spec.priority, payloads, chunk=chunk, alive=submitting, ns=ns)
    except redis.OutOfMemoryError as exc:
        # Recorded, some of its jobs not: they show lost at once (no minute's wait for the key to expire), and
        # requeue adds exactly those once Redis has room. A held run's list of jobs is short, or the run is not
        # in the held set that workers release from: it is cancelled and submitted again.
        client.delete(submitting[0])
        then = f"`refresher jobs requeue {run_id}` adds the missing ones"
        if state == "held":  # not released yet: its list of held jobs is short
            then = f"`refresher jobs cancel {run_id}` and submit again"
        raise JobError(
            f"run {run_id}: Redis is out of memory, it refused some of the run's {len(payloads)} jobs "
            f"({one_line(exc)}): make room (`refresher jobs prune`, or raise its maxmemory), then {then}",
            field="queue",
            value=run_id,
        ) from exc
    client.delete(submitting[0])
    return Submitted(
        run_id,
        len(payloads),
        spec.priority,
        spec.held_until,
        round(time.perf_counter() - began, 4),
        timings,
        chunk,
        ns.name,
    )


@dataclass(frozen=True)
class TierStatus:
    tier: str
    weight: int
    queued: int
    in_flight: int


@dataclass(frozen=True)
class RunStatus:
    """``jobs status``: where a run stands, from its counters."""

    run_id: str
    profile: str
    target: str
    priority: str
    state: str
    total: int
    done: int
    pending: int
    in_flight: int
    retrying: int
    dead: int
    held: int
    rows_loaded: int
    segments_loaded: int
    rows_per_second: float | None
    eta_seconds: float | None
    held_until: str | None
    features: dict[str, Any] | None
    tiers: list[TierStatus]
    read_ms: float
    # Why an 'incomplete' run with nothing dead stopped: its features failed every attempt.
    error: str | None = None
    # Jobs counted submitted that are neither in the run's stream nor done, dead, retrying or held: the stream
    # was trimmed or deleted by hand. A lower bound (the stream holds other runs' jobs too); nothing runs them.
    lost: int = 0
    # The namespace the run is in (``refresher.jobs.namespace``).
    namespace: str = DEFAULT.name

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _int(raw: dict[bytes, bytes], name: str) -> int:
    return int(raw.get(name.encode(), b"0"))


def run_status(
    client: redis.Redis, run_id: str, *, now: float | None = None, ns: Namespace = DEFAULT
) -> RunStatus:
    began = time.perf_counter()
    keys = [ns.run(run_id, part) for part in ("", "inflight", "held", "submitting")]
    replies = client.register_script(STATUS)(keys=[*keys, *map(ns.stream, TIERS)], args=[GROUP])
    flat = replies[0]
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    if b"spec" not in raw:  # none, or what a worker's counter left of a hash deleted by hand (``run_spec``)
        raise no_such_run(run_id, ns)
    in_flight, held = int(replies[1]), int(replies[2])
    tiers, lengths = [], {}
    for i, tier in enumerate(TIERS):
        lengths[tier], busy = int(replies[4 + 2 * i]), int(replies[5 + 2 * i])
        tiers.append(TierStatus(tier, WEIGHTS[tier], lengths[tier] - busy, busy))
    spec = json.loads(raw[b"spec"])
    total, done, dead, retrying = (_int(raw, n) for n in ("total", "done", "dead", "retrying"))
    rows = _int(raw, "rows")
    started = float(raw.get(b"started_at", b"0"))
    last = float(raw.get(b"last_done_at", b"0"))
    rate = rows / (last - started) if started and last > started else None
    seg_rate = done / (last - started) if started and last > started else None
    remaining = total - done - dead
    state = raw[b"state"].decode()
    lost = 0
    if state == "queued" and not replies[3]:
        in_stream = remaining - retrying - held  # in flight ones are still stream entries, until acknowledged
        lost = max(in_stream - lengths[spec["priority"]], 0)
    features = json.loads(raw[b"features"]) if b"features" in raw else None
    return RunStatus(
        run_id=run_id,
        profile=spec["profile"],
        target=spec["target"],
        priority=spec["priority"],
        state=state,
        total=total,
        done=done,
        pending=max(remaining - in_flight - retrying - held - lost, 0),
        in_flight=in_flight,
        retrying=retrying,
        dead=dead,
        held=held,
        rows_loaded=rows,
        segments_loaded=_int(raw, "loaded"),
        rows_per_second=round(rate, 1) if rate else None,
        eta_seconds=round(remaining / seg_rate, 1) if seg_rate and state != "cancelled" else None,
        held_until=spec.get("held_until") if state == "held" else None,
        features=features,
        tiers=tiers,
        read_ms=round((time.perf_counter() - began) * 1000, 3),
        error=raw[b"error"].decode() if b"error" in raw else None,
        lost=lost,
        namespace=ns.name,
    )


def list_runs(client: redis.Redis, limit: int = 50, *, ns: Namespace = DEFAULT) -> list[RunStatus]:
    """The ``limit`` latest runs of namespace ``ns``, newest first."""
    runs = []
    for member in client.zrevrange(ns.runs, 0, limit - 1):
        try:
            runs.append(run_status(client, text(member), ns=ns))
        except JobError:  # its hash deleted by hand, its id left in the index
            continue
    return runs


def runs_in_default(client: redis.Redis, ns: Namespace) -> int:
    """How many runs the default namespace holds when ``ns`` is another (0 when it is the default): the runs a
    checkout submitted before it set a namespace are there, not lost, and ``jobs list`` says so."""
    return 0 if ns.is_default else int(client.zcard(DEFAULT.runs))


def cancel_run(client: redis.Redis, run_id: str, *, ns: Namespace = DEFAULT) -> RunStatus:
    """Stop a run: workers acknowledge its remaining jobs without running them; loaded segments stay."""
    cancel = client.register_script(CANCEL)  # checked and cancelled in one step (``CANCEL``)
    if not cancel(keys=[ns.run(run_id), ns.run(run_id, "held"), ns.held], args=[run_id]):
        raise no_such_run(run_id, ns)
    return run_status(client, run_id, ns=ns)


# `jobs requeue` and `jobs retry-dead` of one run exclude each other: two at once (an operator and a cron job), or a
# dead letter revived between a requeue's stream and dead-letter reads, put the same job on the stream twice.
# A redis-py lock (SET NX PX with an owner token, released by compare-and-delete), renewed while it runs, and a
# fence: a holder stopped past its expiry (SIGSTOP, a suspended machine; its renewal stopped with it) while another
# took the lock put the same jobs back again when it went on. Each write checks the token in its own script.
_REQUEUE_LOCK_TTL = 30.0


@dataclass(frozen=True)
class _Fence:
    """The run's requeue lock as this holder's writes check it: its key and this holder's token."""

    run_id: str
    action: str
    key: str
    token: bytes

    def lost(self, done: str) -> JobError:
        return JobError(
            f"run {self.run_id!r}: this `jobs {self.action}` was held up past its {_REQUEUE_LOCK_TTL:.0f} s lock "
            f"(stopped, or Redis out of reach), which another may hold now; it stopped after {done}: "
            f"`refresher jobs status {self.run_id}` shows what is left",
            field="run",
            value=self.run_id,
        )


@contextmanager
def _requeue_lock(client: redis.Redis, run_id: str, action: str, ns: Namespace) -> Iterator[_Fence]:
    key = ns.run(run_id, "requeue-lock")
    lock = client.lock(key, timeout=_REQUEUE_LOCK_TTL, blocking=False, thread_local=False)
    if not lock.acquire():
        raise JobError(
            f"run {run_id!r}: a `jobs requeue` or `jobs retry-dead` of it is running; "
            f"run `jobs {action} {run_id}` again once it has ended",
            field="run",
            value=run_id,
        )
    with held_lock(lock, every=_REQUEUE_LOCK_TTL / 3):
        yield _Fence(run_id, action, key, lock.local.token)


def retry_dead(client: redis.Redis, run_id: str, *, ns: Namespace = DEFAULT) -> int:
    """Put a run's dead-lettered jobs back on their stream with a fresh attempt count, and its features when
    they failed; returns how many jobs. Each is checked and moved in one step (``REVIVE``): a run deleted
    meanwhile is not made again as a hash without a spec. Never beside a requeue of the run (``_requeue_lock``),
    nor once its lock was lost (``_Fence``)."""
    require_run(client, run_id, ns)
    with _requeue_lock(client, run_id, "retry-dead", ns) as fence:
        revive = client.register_script(REVIVE)
        moved = 0
        entries: Any = client.xrange(ns.dead)
        for entry_id, fields in entries:
            if text(fields.get(b"run", b"")) != run_id:
                continue
            job = {**json.loads(fields[b"job"]), "attempt": 0}
            keys = [
                ns.dead,
                ns.stream(job["tier"]),
                ns.run(run_id),
                ns.run(run_id, "dead-segs"),
                ns.run(run_id, "done"),
                fence.key,
                record_key(ns, run_id),
            ]
            args = [entry_id, json.dumps(job, sort_keys=True), job["seg"], fence.token]
            result = int(revive(keys=keys, args=args))
            if result < 0:
                raise fence.lost(f"{moved} dead job(s) back")
            moved += result
        if not moved:  # its features failed: again, fresh attempts
            keys = [ns.run(run_id), ns.features_due, fence.key, record_key(ns, run_id)]
            if int(client.register_script(REVIVE_FEATURES)(keys=keys, args=[run_id, fence.token])) < 0:
                raise fence.lost("0 dead job(s) back")
    return moved


def requeue_lost(client: redis.Redis, run_id: str, *, chunk: int = 1000, ns: Namespace = DEFAULT) -> int:
    """``jobs requeue``: put back on the run's stream its lost jobs (the stream trimmed or deleted by hand, a
    submit killed midway), fresh attempts; returns how many. Lost: submitted (``run:{id}:jobs``), yet neither in
    the stream nor done, dead or waiting out a retry. Each source is read once its jobs can only have left for one
    read after it: the retries, the stream to its end, the retries again, the dead letters, the stream's entries
    added since its read (a retry promoted meanwhile), the done set last. A dead letter moves back only by
    ``retry_dead``, which the lock keeps out until this ends, as it does a second requeue. A job taken by a worker
    whose stream entry was trimmed goes back too; its second run is a no-op (the ledger) and counts once (the done
    set). Run again, it finds nothing lost. A run cancelled or deleted meanwhile stops it with a ``JobError``."""
    spec = require_run(client, run_id, ns)
    with _requeue_lock(client, run_id, "requeue", ns) as fence:
        return _requeue_locked(client, fence, spec, chunk, ns)


def _requeue_locked(
    client: redis.Redis, fence: _Fence, spec: dict[str, Any], chunk: int, ns: Namespace
) -> int:
    run_id = fence.run_id
    pipe = client.pipeline(transaction=True)
    pipe.get(ns.run(run_id, "jobs"))
    pipe.hget(ns.run(run_id), "state")
    pipe.exists(ns.run(run_id, "submitting"))
    blob, state, submitting = pipe.execute()
    if blob is None:
        raise JobError(
            f"run {run_id!r} was submitted without its job list (before `jobs requeue`): "
            f"`refresher jobs cancel {run_id}` and submit again",
            field="run",
            value=run_id,
        )
    if submitting:
        raise JobError(
            f"run {run_id!r} is still being submitted: requeue it once `jobs submit` has ended (or a minute after "
            "it was killed)",
            field="run",
            value=run_id,
        )
    if text(state) != "queued":  # held: its jobs wait in Redis; else every job is settled
        return 0
    tier = spec["priority"]
    stream = ns.stream(tier)
    known = _segments_of(run_id, _retries(client, chunk, ns))
    in_stream, last = _stream_jobs(client, stream, chunk, "-")
    known |= _segments_of(run_id, in_stream)
    known |= _segments_of(run_id, _retries(client, chunk, ns))
    known |= _segments_of(run_id, (fields.get(b"job") for _id, fields in _entries(client, ns.dead, chunk)))
    known |= _segments_of(run_id, _stream_jobs(client, stream, chunk, last)[0])
    known |= {text(m) for m in client.sscan_iter(ns.run(run_id, "done"), count=chunk)}
    jobs = _jobs_of_list(blob)
    lost = [(seg, _payload(run_id, tier, seg, "", tz, force)) for seg, tz, force in jobs if seg not in known]
    script = client.register_script(REQUEUE)
    keys = [ns.run(run_id), ns.run(run_id, "done"), stream, ns.run(run_id, "submitting"), fence.key]
    added = 0
    for start in range(0, len(lost), chunk):
        args: list[bytes | str] = [fence.token]
        args += [part for pair in lost[start : start + chunk] for part in pair]
        result = int(script(keys=keys, args=args))
        if result == -2:  # stopped past its lock's expiry: another requeue may have put these back already
            raise fence.lost(f"{added} of {len(lost)} lost job(s)")
        if result < 0:  # cancelled, deleted or finished meanwhile: it said "K lost job(s) back", exit 0
            now = client.hget(ns.run(run_id), "state") if run_spec(client, run_id, ns) is not None else None
            why = f"{text(now)} meanwhile" if now is not None else "deleted meanwhile"
            raise JobError(
                f"run {run_id!r}: {why}, requeue stopped after {added} of {len(lost)} lost job(s)",
                field="run",
                value=run_id,
            )
        added += result
    return added


def _stream_jobs(client: redis.Redis, stream: str, chunk: int, after: str) -> tuple[list[bytes | None], str]:
    """The job payloads of a stream's entries after ``after`` (``-``: all), and the id to read on from."""
    payloads: list[bytes | None] = []
    for entry_id, fields in _entries(client, stream, chunk, after):
        payloads.append(fields.get(b"job"))
        after = "(" + text(entry_id)
    return payloads, after


def _chunks(
    client: redis.Redis, stream: str, chunk: int, after: str = "-"
) -> Iterator[list[tuple[Any, dict[bytes, bytes]]]]:
    """A stream's entries after ``after`` (``-``: all), ``chunk`` at a time (Redis answers others between two
    reads), to its end: entries added meanwhile are read too."""
    while True:
        entries: Any = client.xrange(stream, after, "+", count=chunk)
        if not entries:
            return
        yield entries
        after = "(" + text(entries[-1][0])


def _entries(
    client: redis.Redis, stream: str, chunk: int, after: str = "-"
) -> Iterator[tuple[Any, dict[bytes, bytes]]]:
    for entries in _chunks(client, stream, chunk, after):
        yield from entries


def _retries(client: redis.Redis, chunk: int, ns: Namespace) -> Iterator[bytes]:
    return (payload for payload, _due in client.zscan_iter(ns.retry, count=chunk))


def _segments_of(run_id: str, payloads: Iterable[bytes | None]) -> set[str]:
    """The segments of ``run_id``'s jobs among ``payloads`` (one that is not a job's is skipped)."""
    jobs = (_job_of(raw) for raw in payloads)
    return {str(job.get("seg")) for job in jobs if job is not None and job.get("run") == run_id}


@dataclass(frozen=True)
class Deleted:
    """``jobs delete`` / ``jobs prune``: the runs removed, those left because they are running, and how many
    stream entries, dead letters and waiting retries of theirs went with them."""

    deleted: list[str]
    running: dict[str, str]
    entries: int
    dry_run: bool = False
    # Rows of ``refresher_fences`` removed from the deleted runs' targets, and the targets not reached (each with
    # its runs and why), whose rows stay.
    fences: int = 0
    fences_left: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def delete_runs(
    client: redis.Redis,
    run_ids: Sequence[str],
    *,
    force: bool = False,
    chunk: int = 1000,
    settings: Settings | None = None,
    ns: Namespace = DEFAULT,
) -> Deleted:
    """Remove runs and all their keys (``DELETE_RUNS``), then their entries in the streams, the dead letters and
    the retries, ``chunk`` at a time; a running one only with ``force``. The entries of runs an earlier delete or
    prune removed without finishing (killed between the two steps: the ``deleting`` set) go too. With ``settings`` (the
    CLI's), the deleted runs' fences go from their targets too (``_drop_fences``)."""
    deleted: list[str] = []
    running: dict[str, str] = {}
    if run_ids:
        deleted, refused, states = _delete_keys(client, run_ids, force, ns)
        running = dict(zip(refused, states, strict=True))
    unfinished = {text(m) for m in client.smembers(ns.deleting)}  # this one's, and any a killed one left
    entries = _remove_entries(client, unfinished, chunk, ns) if unfinished else 0
    if unfinished:
        client.srem(ns.deleting, *unfinished)
    fences, left = _drop_due_fences(client, settings, ns) if settings is not None else (0, {})
    return Deleted(deleted, running, entries, fences=fences, fences_left=left)


def _drop_due_fences(client: redis.Redis, settings: Settings, ns: Namespace) -> tuple[int, dict[str, str]]:
    """``_drop_fences`` of the runs in the ``fences-due`` hash: those ``DELETE_RUNS`` just removed whose features step
    claimed its fence in its target (a token was handed out: ``run:{id}:features-fence``; the others have no row
    there), and any a prune killed before their targets were tried left. Recorded in the step that removes the
    runs' keys: read from the specs before it, and dropped after it, a prune killed in between left the rows for
    good (the specs gone). Cleared once tried, reached or not: a target down for good is not tried again."""
    due = {text(run): raw for run, raw in client.hgetall(ns.fences_due).items()}
    if not due:
        return 0, {}
    fenced = {}
    for run, raw in due.items():
        try:
            spec = json.loads(raw)
            fenced[run] = (str(spec["profile"]), str(spec["target"]))
        except (ValueError, TypeError, KeyError):  # a spec written by hand: no target to try, and not kept
            continue
    done = _drop_fences(settings, fenced)
    client.hdel(ns.fences_due, *due)
    return done


# Seconds ``jobs prune``/``delete`` wait for a run's target to answer, and then for another transaction's lock on
# its fence rows (a worker stopped inside a features write transaction), before they leave those rows.
FENCE_CONNECT_TIMEOUT = 10
FENCE_LOCK_WAIT = 10.0


def _drop_fences(settings: Settings, fenced: dict[str, tuple[str, str]]) -> tuple[int, dict[str, str]]:
    """Remove the deleted runs' rows of ``refresher_fences`` (one each, made by their features step) from their
    targets: how many went, and each target not reached or whose rows another transaction kept locked past
    ``FENCE_LOCK_WAIT``, with why (its rows stay; a small row each, harmless): a prune never hangs there.
    After the runs' keys went from Redis: a target down or refusing us never keeps a run in Redis. Each target
    is reached as a worker reaches it (the profile's own server served here, else libpq's credentials; another
    machine's database door shut fails at once)."""
    from refresher.snapshot import connect_target

    by_target: dict[tuple[str, str], list[str]] = {}
    for run, where in fenced.items():
        by_target.setdefault(where, []).append(run)
    removed = 0
    left: dict[str, str] = {}
    for (profile, target), runs in by_target.items():
        try:
            server = served_here(settings, profile, target)
            with connect_target(
                server, target, foreign_wait=False, autocommit=True, connect_timeout=FENCE_CONNECT_TIMEOUT
            ) as conn:
                removed += drop_fences(conn, [features_fence_name(run) for run in runs], FENCE_LOCK_WAIT)
        except psycopg.errors.LockNotAvailable:
            left[target] = (
                f"rows locked by another transaction for over {FENCE_LOCK_WAIT:g} s (a worker stopped inside a "
                f"features write?): {len(runs)} run(s) ({' '.join(runs)})"
            )
        except Exception as exc:  # whatever kept us out of that target: named, and the other targets go on
            left[target] = f"target not reached: {len(runs)} run(s) ({' '.join(runs)}): {one_line(exc)}"
    return removed, left


def _delete_keys(
    client: redis.Redis, run_ids: Sequence[str], force: bool, ns: Namespace
) -> tuple[list[str], list[str], list[str]]:
    """``DELETE_RUNS``: the runs deleted (now in the ``deleting`` set), those refused, and the states of the refused."""
    script = client.register_script(DELETE_RUNS)
    reply: Any = script(args=[int(force), ns.prefix, ",".join(RUNNING_STATES), *run_ids])
    deleted, refused, states = ([text(r) for r in part] for part in reply)
    return deleted, refused, states


def _job_of(raw: bytes | None) -> dict[str, Any] | None:
    """A job's JSON payload; None for one that is not (a payload written by hand is skipped)."""
    try:
        job = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return job if isinstance(job, dict) else None


def _run_of(raw: bytes | None) -> str | None:
    """The run of a job's JSON payload; None for one that is not."""
    job = _job_of(raw)
    return str(job.get("run")) if job is not None else None


def _remove_entries(client: redis.Redis, runs: set[str], chunk: int, ns: Namespace) -> int:
    """Remove the jobs of ``runs`` from every stream (acknowledged first, so no consumer keeps a pending entry
    pointing at nothing), their dead letters and waiting retries; returns how many. Each stream is read ``chunk``
    entries at a time: Redis answers others between two reads. The runs' hashes are gone already, so no job of
    theirs is added meanwhile; one read by a worker meanwhile is only acknowledged by it."""
    removed = 0
    for stream in [*(ns.stream(tier) for tier in TIERS), ns.dead]:
        for entries in _chunks(client, stream, chunk):
            if stream == ns.dead:
                doomed = [mid for mid, fields in entries if text(fields.get(b"run", b"")) in runs]
            else:
                doomed = [mid for mid, fields in entries if _run_of(fields.get(b"job")) in runs]
            if doomed:
                pipe = client.pipeline(transaction=False)
                if stream != ns.dead:
                    pipe.xack(stream, GROUP, *doomed)
                pipe.xdel(stream, *doomed)
                replies = pipe.execute(raise_on_error=False)
                for reply in replies:  # no group yet is nothing pending to acknowledge
                    if isinstance(reply, redis.ResponseError) and "NOGROUP" not in str(reply):
                        raise reply
                removed += int(replies[-1])
    doomed_retries = [p for p in _retries(client, chunk, ns) if _run_of(p) in runs]
    for start in range(0, len(doomed_retries), chunk):
        removed += int(client.zrem(ns.retry, *doomed_retries[start : start + chunk]))
    return removed


def delete_run(
    client: redis.Redis,
    run_id: str,
    *,
    force: bool = False,
    settings: Settings | None = None,
    ns: Namespace = DEFAULT,
) -> Deleted:
    """``jobs delete RUN``: a running run is refused in one line unless ``force``."""
    if run_spec(client, run_id, ns) is None and client.zscore(ns.runs, run_id) is None:
        raise no_such_run(run_id, ns)
    done = delete_runs(client, [run_id], force=force, settings=settings, ns=ns)
    if run_id in done.running:
        state = done.running[run_id]
        raise JobError(
            f"run {run_id!r} is {state}: its jobs are still out; `refresher jobs cancel {run_id}` first, "
            "or --force to delete it running",
            field="run",
            value=run_id,
        )
    return done


def prune_runs(
    client: redis.Redis,
    older_than: float,
    *,
    force: bool = False,
    dry_run: bool = False,
    settings: Settings | None = None,
    ns: Namespace = DEFAULT,
) -> Deleted:
    """``jobs prune``: remove the runs whose last activity (submit, first start, last segment loaded) is more
    than ``older_than`` seconds ago by Redis's clock; running ones are left and named unless ``force``."""
    cutoff = redis_time(client) - older_than
    submitted = [text(m) for m in client.zrangebyscore(ns.runs, "-inf", cutoff)]
    pipe = client.pipeline(transaction=False)
    for run in submitted:
        pipe.hmget(ns.run(run), "started_at", "last_done_at", "state")
    old, running = [], {}
    for run, (started, last, state) in zip(submitted, pipe.execute(), strict=True):
        if max(float(started or 0), float(last or 0)) > cutoff:
            continue
        if not force and state is not None and text(state) in RUNNING_STATES:
            running[run] = text(state)
        else:
            old.append(run)
    if dry_run:
        return Deleted(old, running, 0, dry_run=True)
    done = delete_runs(client, old, force=force, settings=settings, ns=ns)
    return replace(done, running={**running, **done.running})


__all__ = [
    "Deleted",
    "RunSpec",
    "RunStatus",
    "Submitted",
    "cancel_run",
    "delete_run",
    "delete_runs",
    "list_runs",
    "prune_runs",
    "requeue_lost",
    "retry_dead",
    "run_status",
    "runs_in_default",
    "submit_jobs",
]
