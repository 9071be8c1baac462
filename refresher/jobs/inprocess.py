"""The in-process executor: runs a plan's segment jobs in this process, fetching while it loads.

Fetching (source + store write, or a warm store's reads) runs in a producer thread while the calling thread
loads into Postgres, so two cores overlap generation/compression/decompression with COPY. Jobs are produced in batches (``store_batches``) because
the store records a batch in one manifest transaction.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher import bodies, load
from refresher.jobs.segment import SegmentJob, SegmentTotals, fetch_tables, load_tables, stored_loads
from refresher.segments import Segment
from refresher.sources.base import Source

# Minute segments per store write: one manifest transaction per batch keeps the lock short and the count of
# manifest transactions (each a checkpoint of the file) low (about 2,400 segments in a cold backtesting run).
STORE_BATCH = 200
# Daily segments per minute segment in a store batch (2,000 a batch): a batch's fixed part (then two manifest
# opens, now one; a pack file, an fsync: about 0.2 s) was paid by 200 daily segments of ~21 rows, half the
# store's time in a cold run of the production daily profile.
DAILY_SHARE = 10
# Rows per load transaction: a batch of small segments commits once (a month of daily bars is ~21 rows, and a
# transaction per segment cost ~5 ms), while minute segments (~8,000 rows each) still commit every few dozen.
# About one store batch of daily segments (2,000 x ~21 rows), not more: at 256 k rows the loader gathered six of
# them before its first COPY while the fetcher, two batches ahead at most, waited for it, so the two took turns
# instead of overlapping, and the last six batches loaded after the last fetch. Peak RSS of the cold production
# refresh, same session: 1,000 symbols 507-510 MB -> 370-374 MB, 250 symbols 396 -> 329 MB.
LOAD_ROWS = 64 * 1024
# Minute segments commit a month at a time (the jobs come month by month), up to this many rows: the transaction
# that creates a month's partition fills it with COPY FREEZE (no WAL), so the month's other segments should ride
# in it rather than follow with plain COPYs (``refresher.partitions``). A kill loses at most the month in flight.
MONTH_ROWS = 2 * 1024 * 1024
# Load transactions at once, each on its own connection (``InProcessExecutor``): the server's share of a new
# month (COPY FREEZE and the key build) is one core's work, and the machines we measure on have two.
LOADERS = 2


class ProgressCallback(Protocol):
    """Told after each segment: the phase, segments done of total, and rows loaded so far."""

    def __call__(self, phase: str, done: int, total: int, rows: int = 0) -> None: ...


Produced = tuple[SegmentJob, pa.Table | bodies.StoredBody, str]


class Fetcher(threading.Thread):
    """Produces (job, table, content_hash): first for the jobs the store lacks, storing each batch first, then
    for those it holds, read ahead of the loader (a warm store's reads overlap the COPYs instead of taking turns
    with them on the loading thread)."""

    _DONE = object()

    def __init__(
        self, source: Source, store: FeatureStore, jobs: Sequence[SegmentJob], in_store: Sequence[SegmentJob]
    ) -> None:
        super().__init__(name="refresher-fetch", daemon=True)
        self.source, self.store, self.jobs, self.in_store = source, store, jobs, in_store
        # Two batches ahead at most: enough to keep the loader busy, bounded memory (~400 segments).
        self.out: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.cancelled = threading.Event()
        # Set when this thread ends, whatever way: every table it was to make is stored and produced (or it
        # failed, and the refresh with it). From then on its core is free while the loaders finish.
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            for batch in store_batches(self.jobs):
                if self.cancelled.is_set():
                    return
                produced = fetch_tables(batch, self.source, self.store)
                self._put([(job, t, h) for job, (t, h) in zip(batch, produced, strict=True)])
            # Only once the fetches are done: reading both at once would compete for the core the loader needs.
            for batch in store_batches(self.in_store):
                if self.cancelled.is_set():
                    return
                self._put(stored_loads(batch, self.store, self.source))
        except BaseException as exc:  # handed to the loading thread, which re-raises it
            self._put(exc)
        finally:
            self.finished.set()
            self._put(self._DONE)

    def _put(self, item: Any) -> None:
        while not self.cancelled.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Stop after the batch in hand and wait for it: what it stored stays (store writes are atomic and
        content-addressed), what it produced is dropped. Then nothing else uses the source."""
        self.cancelled.set()
        self.join()

    def results(self) -> Iterator[list[Produced]]:
        while True:
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                if (
                    self.cancelled.is_set()
                ):  # then no _DONE may come (``_put`` gives up): a loader must not wait
                    return
                continue
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def fetch_ahead(source: Source, store: FeatureStore, jobs: Sequence[SegmentJob]) -> Fetcher:
    """Start producing ``jobs``' tables before there is a database to load them into (a refresh does so while
    its server starts), for ``InProcessExecutor.run(jobs, ahead=...)``; at most two store batches wait in
    memory for the loaders. ``stop()`` it when they will not come."""
    fetcher = Fetcher(
        source,
        store,
        [job for job in jobs if job.stored_hash is None],
        [job for job in jobs if job.stored_hash is not None],
    )
    fetcher.start()
    return fetcher


def store_batches(jobs: Sequence[SegmentJob]) -> Iterator[Sequence[SegmentJob]]:
    """``jobs`` cut into store batches, in order: ``STORE_BATCH`` minute segments or ``DAILY_SHARE`` times as
    many daily ones (a mix in proportion)."""
    start = weight = 0
    for end, job in enumerate(jobs):
        share = 1 if job.segment.timeframe == "1d" else DAILY_SHARE
        if weight and weight + share > STORE_BATCH * DAILY_SHARE:
            yield jobs[start:end]
            start, weight = end, 0
        weight += share
    if start < len(jobs):
        yield jobs[start:]


Group = tuple[str, dt.date | None]


def _group_of(segment: Segment) -> Group:
    """The load transaction a segment may share: its month's for a minute segment, any for a daily one."""
    return (segment.timeframe, segment.month if segment.timeframe == "1m" else None)


def _load_batches(
    chunks: Iterable[Sequence[Produced]], jobs: Sequence[SegmentJob] = ()
) -> Iterator[list[Produced]]:
    """The fetcher's chunks re-cut into load transactions (one segment at least): minute segments of one month
    up to ``MONTH_ROWS`` rows, other runs of segments up to ``LOAD_ROWS``.

    A transaction may span chunks: store batches do not fall on month boundaries, and a month cut in two would
    load its second part through the parent, a B-tree insert per row, instead of into the partition its first
    part creates (``refresher.partitions``). So the last group of a chunk waits for the next chunk, or for the
    end; or for a failed fetch, which still gets what came before it loaded before it is raised (as when every
    chunk was loaded on its own). Unless ``jobs`` (the run's) say the group is complete: then it is handed over
    at its last segment, so a loader does not wait for the fetcher's next batch to start a month it holds whole
    (the second loader's first month, when a store batch holds two)."""
    left = Counter(_group_of(job.segment) for job in jobs)
    pending: list[Produced] = []
    rows = 0
    group: Group | None = None
    try:
        for chunk in chunks:
            for item in chunk:
                this = _group_of(item[0].segment)
                limit = MONTH_ROWS if this[1] is not None else LOAD_ROWS
                if pending and (this != group or rows + item[1].num_rows > limit):
                    yield pending
                    pending, rows = [], 0
                group = this
                rows += item[1].num_rows
                pending.append(item)
                left[this] -= 1
                if left[this] == 0:  # the group's last segment of the run: nothing more will join it
                    yield pending
                    pending, rows = [], 0
    except Exception:
        if pending:
            yield pending
        raise
    if pending:
        yield pending


def _allow_shrink(batch: Sequence[Produced]) -> bool:
    # One profile setting, copied onto every job of the plan.
    return all(job.allow_shrink for job, _table, _hash in batch)


class InProcessExecutor:
    """Runs segment jobs against one connection, or ``loaders`` connections at once (``connect`` opens the
    others); each must be in autocommit mode so that each batch's transaction is a real BEGIN/COMMIT and every
    finished batch survives a kill -9.

    Several loaders take the load transactions in turn from one queue, each a whole batch (a month of minute
    segments): the server fills a new month's partition at about 0.9 us a row on one core, so two months at
    once use both cores (``refresher.partitions`` says why they do not deadlock). A failed batch rolls back
    alone; the other loaders finish the batch they hold, take no other, and the first error is raised."""

    def __init__(
        self,
        source: Source,
        store: FeatureStore,
        conn: psycopg.Connection[Any],
        *,
        on_loaded: Callable[[Sequence[load.SegmentLoad], bool], None] | None = None,
        keep_daily: bool = True,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        loaders: int = 1,
    ) -> None:
        """``keep_daily=False``: no features step will read the fetched daily tables (``SegmentTotals``)."""
        self.source, self.store, self.conn = source, store, conn
        self.on_loaded = on_loaded  # told each committed batch (see ``load_tables``)
        self.keep_daily = keep_daily
        self.connect = connect
        self.loaders = loaders if connect is not None else 1

    def run(
        self,
        jobs: Sequence[SegmentJob],
        progress: ProgressCallback | None = None,
        *,
        ahead: Fetcher | None = None,
    ) -> SegmentTotals:
        """Run ``jobs``; ``ahead``: their fetcher, started earlier by ``fetch_ahead`` (for these very jobs)."""
        fetcher = ahead if ahead is not None else fetch_ahead(self.source, self.store, jobs)
        run = _LoadRun(self, _load_batches(fetcher.results(), jobs), len(jobs), progress)
        helpers: list[tuple[threading.Thread, psycopg.Connection[Any]]] = []
        finished = False
        try:
            for k in range(1, self.loaders):
                assert self.connect is not None  # loaders is 1 without it
                conn = self.connect()
                thread = threading.Thread(
                    target=run.drain, args=(conn,), name=f"refresher-load-{k}", daemon=True
                )
                helpers.append((thread, conn))
                thread.start()
            run.drain(self.conn, reraise=True)
            for thread, _ in helpers:
                thread.join()
            finished = True
        finally:
            run.stop.set()
            fetcher.cancelled.set()
            if not finished:
                # Ctrl-C or an error here: the other loaders' statements are cancelled (their batches roll back
                # whole) rather than waited for.
                for thread, conn in helpers:
                    if thread.is_alive():
                        conn.cancel_safe(timeout=2)
                for thread, _ in helpers:
                    thread.join(timeout=5)
            for thread, conn in helpers:
                if not thread.is_alive():  # else it still uses it; the process's exit closes it
                    conn.close()
            # On Ctrl-C or an error, do not wait for the batch the fetcher is producing (seconds of work): it
            # is a daemon thread, and what it stores is written crash-safe like any kill -9 would leave it.
            fetcher.join(timeout=5 if finished else 0.2)
        if run.error is not None:
            raise run.error
        if run.emptied:
            raise load.ShrinkError.refused(run.emptied)
        return run.totals


class _LoadRun:
    """What the loaders of one ``InProcessExecutor.run`` share: the batches to take, the totals, the first
    error; one lock around all of it (the loads themselves run outside it)."""

    def __init__(
        self,
        executor: InProcessExecutor,
        batches: Iterator[list[Produced]],
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.executor, self.batches, self.total, self.progress = executor, batches, total, progress
        self.totals = SegmentTotals(keep_daily=executor.keep_daily)
        self.emptied: list[tuple[Segment, int]] = []  # load the rest; one error naming all of them at the end
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def drain(self, conn: psycopg.Connection[Any], *, reraise: bool = False) -> None:
        """Load batches on ``conn`` until there are none, or one loader failed. An error (a load's, or a fetch's
        that ``next`` raises) becomes the run's, and the other loaders finish the batch they hold: what came
        before a failed fetch is loaded, as with one loader. ``reraise``: the calling thread's Ctrl-C is raised
        here at once, and the run cancels the others."""
        try:
            while True:
                with self.lock:
                    if self.stop.is_set():
                        return
                    batch = next(self.batches, None)
                    if batch is None:
                        return
                    # the rows quarantined when the table was produced (by this run or the one that stored it)
                    rejects = self.executor.source.rejects
                    loads = [
                        (job, table, digest, rejects.pop(job.segment, [])) for job, table, digest in batch
                    ]
                outcomes, refused = load_tables(
                    conn, loads, allow_shrink=_allow_shrink(batch), on_loaded=self._on_loaded
                )
                with self.lock:
                    self.emptied.extend(refused)
                    for outcome, (_job, table, _hash) in zip(outcomes, batch, strict=True):
                        self.totals.add(outcome, table if isinstance(table, pa.Table) else None)
                    if self.progress:
                        self.progress("load", self.totals.done, self.total, self.totals.rows_loaded)
        except BaseException as exc:
            with self.lock:
                if self.error is None and not self.stop.is_set():
                    self.error = exc
                self.stop.set()
            if reraise and not isinstance(exc, Exception):
                raise

    def _on_loaded(self, items: Sequence[load.SegmentLoad], allow_shrink: bool) -> None:
        if self.executor.on_loaded is not None:
            with self.lock:
                self.executor.on_loaded(items, allow_shrink)


__all__ = [
    "DAILY_SHARE",
    "LOADERS",
    "LOAD_ROWS",
    "MONTH_ROWS",
    "STORE_BATCH",
    "Fetcher",
    "InProcessExecutor",
    "fetch_ahead",
    "store_batches",
]
