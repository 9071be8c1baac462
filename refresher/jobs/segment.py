"""The one segment job: produce a segment's table (store hit, or source then store) and load it once.

Both executors call this module, the in-process one (``refresher.jobs.inprocess``) and the Redis worker, so
there is one load path (``refresher.load.load_segments``). Producing works on batches because the store records
a batch in one manifest transaction; the in-process executor loads a batch in one transaction too, the Redis
worker one segment per transaction (each job is acknowledged on its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher import bodies, load
from refresher.errors import LoadError
from refresher.plan import GapPlan
from refresher.segments import Segment
from refresher.sources.base import Source, SourceReport
from refresher.sources.reports import notes_key, notes_table, rejects_key, rejects_of, rejects_table
from refresher.sources.validate import Reject


@dataclass(frozen=True)
class SegmentJob:
    """One segment to bring into a database, with what the plan knew of it."""

    segment: Segment
    key: str
    tz: str
    # The store's content hash when the plan was made; None: the source must produce the segment.
    stored_hash: str | None = None
    # The database's ledger hash when the plan was made; None: not loaded.
    loaded_hash: str | None = None
    # Load even if the ledger holds this content: ``--verify`` found the rows differ from the ledger.
    force: bool = False
    # Let an empty table replace a segment that holds rows (``--allow-shrink``); else ``load.ShrinkError``.
    allow_shrink: bool = False


@dataclass(frozen=True)
class SegmentOutcome:
    """What one segment job did."""

    segment: Segment
    content_hash: str
    rows_loaded: int
    fetched: bool
    loaded: bool


@dataclass
class SegmentTotals:
    """Counters of a set of segment jobs, added up as outcomes arrive."""

    done: int = 0
    fetched: int = 0
    loaded: int = 0
    rows_loaded: int = 0
    # Daily tables fetched from the source, kept for the features step so it need not read them again; only
    # when there is one (``keep_daily``): 60,000 small tables held to the end made the peak RSS grow with the
    # symbols (700 MB at 1,000 symbols x 60 months, 285 MB at 40).
    daily_tables: dict[Segment, pa.Table] = field(default_factory=dict)
    keep_daily: bool = True

    def add(self, outcome: SegmentOutcome, table: pa.Table | None = None) -> None:
        self.done += 1
        self.fetched += outcome.fetched
        self.loaded += outcome.loaded
        self.rows_loaded += outcome.rows_loaded
        if self.keep_daily and outcome.fetched and table is not None and outcome.segment.timeframe == "1d":
            self.daily_tables[outcome.segment] = table


def jobs_of_plan(plan: GapPlan, tz_of: dict[str, str], *, allow_shrink: bool = False) -> list[SegmentJob]:
    """The plan's segment jobs: first those the source must produce, then those the store holds; in each, minute
    segments month by month, so that a month's segments can share the transaction that creates its partition
    (``refresher.partitions``), then daily segments in the plan's order.

    Minutes first: the loaders start on the first two months as soon as the fetcher has read them, instead of
    waiting behind the daily segments' reads (a store batch of them and of the first month's start), and the
    daily segments (one small transaction) load at the end, beside the last month, where a loader has nothing
    else to take (``refresher.jobs.inprocess``)."""
    jobs: list[SegmentJob] = []
    for segment in (*_month_major(plan.to_fetch), *_month_major(plan.to_load)):
        key = plan.keys[segment]
        stored = plan.stored.get(key)
        in_db = plan.loaded.get(segment)
        jobs.append(
            SegmentJob(
                segment,
                key,
                tz_of[segment.symbol],
                stored_hash=stored.content_hash if stored else None,
                loaded_hash=in_db.content_hash if in_db else None,
                force=bool(stored and in_db and stored.content_hash == in_db.content_hash),
                allow_shrink=allow_shrink,
            )
        )
    return jobs


def _month_major(segments: Sequence[Segment]) -> list[Segment]:
    minutes = sorted((s for s in segments if s.timeframe == "1m"), key=lambda s: (s.month, s.symbol))
    return minutes + [s for s in segments if s.timeframe != "1m"]


def fetch_tables(
    jobs: Sequence[SegmentJob], source: Source, store: FeatureStore
) -> list[tuple[pa.Table, str]]:
    """Produce each job's table from the source and store the batch, with what the source left out of each
    segment and the rows it quarantined (``refresher.sources.reports``), in one manifest transaction."""
    before = len(source.reports)
    tables = source.fetch_many([job.segment for job in jobs])
    reported: dict[Segment, list[SourceReport]] = {}
    for report in source.reports[before:]:
        reported.setdefault(report.segment, []).append(report)
    notes: list[tuple[str, pa.Table, str | None]] = []
    for job in jobs:
        left_out = reported.get(job.segment)
        if left_out:  # stored with the segment, so a run served from the store reports them again
            notes.append((notes_key(job.key), notes_table(left_out), job.segment.symbol))
        if source.rejects.get(job.segment):  # the loader writes them; a later load from the store, too
            notes.append(
                (rejects_key(job.key), rejects_table(source.rejects[job.segment]), job.segment.symbol)
            )
    items = [(job.key, t, job.segment.symbol) for job, t in zip(jobs, tables, strict=True)]
    hashes = store.put_many_hashes([*items, *notes])[: len(items)]
    return list(zip(tables, hashes, strict=True))


def stored_tables(
    jobs: Sequence[SegmentJob], store: FeatureStore, source: Source
) -> list[tuple[SegmentJob, pa.Table, str]]:
    """Read each job's table from the store. A file the read finds missing or corrupt (the store evicts it) is
    produced again from the source and stored, in this run; its job comes back with ``stored_hash=None``, so
    it counts as fetched. The rows the source quarantined when it produced a table are read with it, into
    ``source.rejects``, where the loader takes them from as after a fetch."""
    # One store request for the tables and the rows quarantined with them (each request reads the manifest:
    # about 5 ms of CPU a batch); not counted, the plan's lookup counted these.
    found = store.get_many([key for job in jobs for key in (job.key, rejects_key(job.key))], count=False)
    tables = {job.key: found[job.key] for job in jobs if job.key in found}
    lost = [
        replace(job, stored_hash=None) for job in jobs if job.key not in tables or job.stored_hash is None
    ]
    again = (
        dict(zip([job.key for job in lost], fetch_tables(lost, source, store), strict=True)) if lost else {}
    )
    out: list[tuple[SegmentJob, pa.Table, str]] = []
    for job in jobs:
        if job.key in again:
            out.append((replace(job, stored_hash=None), *again[job.key]))
        else:
            kept = found.get(rejects_key(job.key))
            source.rejects[job.segment] = [] if kept is None else rejects_of(job.segment, kept)
            out.append((job, tables[job.key], job.stored_hash or ""))
    return out


def stored_loads(
    jobs: Sequence[SegmentJob], store: FeatureStore, source: Source
) -> list[tuple[SegmentJob, pa.Table | bodies.StoredBody, str]]:
    """``stored_tables``, but a minute segment whose COPY body the store keeps comes back as that body
    (``refresher.bodies``), its file not read: the loader sends the body when its batch fills a new month, and
    reads the table then only if it does not. The rows quarantined with it are read as for a table."""
    minutes = [job.key for job in jobs if job.segment.timeframe == "1m" and job.stored_hash is not None]
    kept = bodies.stored_bodies(store, minutes) if minutes else {}
    served = {
        job.key: kept[job.key]
        for job in jobs
        if job.key in kept and kept[job.key].entry.content_hash == job.stored_hash
    }
    if not served:
        return list(stored_tables(jobs, store, source))
    found = store.get_many([rejects_key(key) for key in served], count=False)
    for job in jobs:
        if job.key in served:
            kept_rejects = found.get(rejects_key(job.key))
            source.rejects[job.segment] = (
                [] if kept_rejects is None else rejects_of(job.segment, kept_rejects)
            )
    rest = iter(stored_tables([job for job in jobs if job.key not in served], store, source))
    return [
        (job, served[job.key], job.stored_hash or "") if job.key in served else next(rest) for job in jobs
    ]


def load_tables(
    conn: psycopg.Connection[Any],
    produced: Sequence[tuple[SegmentJob, pa.Table | bodies.StoredBody, str, Sequence[Reject] | None]],
    *,
    allow_shrink: bool = False,
    on_loaded: Callable[[Sequence[load.SegmentLoad], bool], None] | None = None,
) -> tuple[list[SegmentOutcome], list[tuple[Segment, int]]]:
    """Load a batch of produced tables in one transaction (``refresher.load.load_segments``), skipping those
    the plan saw loaded with exactly that content; the outcomes, and the segments refused as emptied.
    ``on_loaded(items, allow_shrink)`` is told what was committed (``refresher.replay``).

    The in-process refresh made its plan moments ago on the only connection that writes (the profile lock
    keeps other refreshes out), so it trusts the plan's ``loaded_hash`` rather than asking again. A segment
    with quarantined rows loads even so: its rows may be the ones loaded under ``skip``, but its rejects are
    not in ``refresher_rejects`` yet; and so does one without, whose rejects of an earlier quarantine are (rare,
    and it goes through the ledger and the snapshot's replay as any load).
    """
    items: list[load.SegmentLoad] = []
    jobs: list[SegmentJob] = []
    outcomes: dict[Segment, SegmentOutcome] = {}
    unchanged = {
        job.segment
        for job, _table, content_hash, rejects in produced
        if job.loaded_hash == content_hash and not job.force and not rejects
    }
    # An unchanged segment with no rejects now whose old ones are in the table (quarantine switched back to
    # skip) loads too: a segment's rejects describe its current load. None leaves them as they are.
    cleared = [
        job.segment for job, *_, rejects in produced if job.segment in unchanged and rejects is not None
    ]
    unchanged -= load.quarantined(conn, cleared) if cleared else set()
    for job, table, content_hash, rejects in produced:
        if job.segment in unchanged:
            outcomes[job.segment] = SegmentOutcome(
                job.segment, content_hash, 0, job.stored_hash is None, False
            )
            continue
        jobs.append(job)
        items.append(load.SegmentLoad(job.segment, table, content_hash, job.tz, rejects, not job.force))
    batch = load.load_segments(conn, items, allow_shrink=allow_shrink)
    if on_loaded is not None and items:
        on_loaded(items, allow_shrink)
    refused = {segment for segment, _ in batch.emptied}
    for job, item, rows in zip(jobs, items, batch.rows, strict=True):
        loaded = job.segment not in refused
        outcomes[job.segment] = SegmentOutcome(
            job.segment, item.content_hash, rows, job.stored_hash is None, loaded
        )
    return [outcomes[job.segment] for job, *_ in produced], list(batch.emptied)


def load_table(
    conn: psycopg.Connection[Any],
    job: SegmentJob,
    table: pa.Table,
    content_hash: str,
    *,
    rejects: Sequence[Reject] | None = None,
) -> SegmentOutcome:
    """Load one table from a queue: unless the database already holds exactly that content, one transaction.

    The ledger row is read inside the transaction, under an advisory lock on the segment, instead of trusting
    the plan's ``loaded_hash``: a queue may deliver a job twice, or to two workers at once (a reclaimed job
    whose first worker was only slow), and the second must then be a no-op, unless its ``rejects`` differ
    from those in the table (the rows may be those loaded under another ``on_bad_rows``, the rejects not). ``rejects`` (what the source
    quarantined when it produced ``table``, fetched or read back from the store) replace the segment's rows in
    ``refresher_rejects``; None leaves them as they are.
    """
    fetched = job.stored_hash is None
    try:
        with conn.transaction():
            # Bounded: a worker stopped inside this segment's load (SIGSTOP, in its COPY) held the lock for as long
            # as it stayed stopped, and the one that took its job over waited as long (``load.lock_segments``). Not
            # patient: a live load past the wait fails the attempt as a lock timeout (transient, tried again later).
            load.lock_segments(conn, [job.segment], patient=False)
            row = conn.execute(
                "SELECT content_hash FROM refresher_segments "
                "WHERE symbol = %s AND timeframe = %s AND month = %s",
                (job.segment.symbol, job.segment.timeframe, job.segment.month),
            ).fetchone()
            if (
                row is not None
                and row[0] == content_hash
                and not job.force
                and not rejects
                and not (rejects is not None and load.quarantined(conn, [job.segment]))
            ):
                return SegmentOutcome(job.segment, content_hash, 0, fetched, False)
            rows = load.load_segment(
                conn,
                job.segment,
                table,
                content_hash,
                tz=job.tz,
                allow_shrink=job.allow_shrink,
                rejects=rejects,
                may_append=not job.force,
            )
    except psycopg.Error as exc:
        raise LoadError(f"{job.segment}: loading failed: {exc}".rstrip(), segment=str(job.segment)) from exc
    return SegmentOutcome(job.segment, content_hash, rows, fetched, True)


def produce_tables(
    jobs: Sequence[SegmentJob], source: Source, store: FeatureStore
) -> list[tuple[SegmentJob, pa.Table, str]]:
    """Each job's table, asking the store again first (another attempt may have filled it since the plan):
    hits are read, misses produced by the source and stored in one manifest transaction for the batch."""
    entries = store.lookup_hashes([job.key for job in jobs])
    jobs = [replace(j, stored_hash=entries[j.key][0] if j.key in entries else None) for j in jobs]
    misses = [j for j in jobs if j.stored_hash is None]
    hits = [j for j in jobs if j.stored_hash is not None]
    out: dict[Segment, tuple[SegmentJob, pa.Table, str]] = {}
    if misses:
        for job, (table, content_hash) in zip(misses, fetch_tables(misses, source, store), strict=True):
            out[job.segment] = (job, table, content_hash)
    if hits:
        for job, table, content_hash in stored_tables(hits, store, source):
            out[job.segment] = (job, table, content_hash)
    return [out[job.segment] for job in jobs]


def load_produced(
    conn: psycopg.Connection[Any], source: Source, job: SegmentJob, table: pa.Table, content_hash: str
) -> SegmentOutcome:
    """Load a table ``produce_tables`` made, checking the ledger (a queue may deliver a job twice)."""
    rejects = source.rejects.pop(job.segment, [])
    return load_table(conn, job, table, content_hash, rejects=rejects)


def run_segment_job(
    job: SegmentJob, source: Source, store: FeatureStore, conn: psycopg.Connection[Any]
) -> SegmentOutcome:
    """Run one job from a queue: the store is asked again (another attempt may have filled it since the
    plan), and the load checks the ledger so a redelivered job changes nothing."""
    [(job, table, content_hash)] = produce_tables([job], source, store)
    return load_produced(conn, source, job, table, content_hash)


__all__ = [
    "SegmentJob",
    "SegmentOutcome",
    "SegmentTotals",
    "fetch_tables",
    "jobs_of_plan",
    "load_produced",
    "load_table",
    "load_tables",
    "produce_tables",
    "run_segment_job",
    "stored_loads",
    "stored_tables",
]
