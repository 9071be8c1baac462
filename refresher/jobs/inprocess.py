"""The in-process executor: runs a plan's segment jobs in this process, fetching while it loads.

Fetching (source + store write) runs in a producer thread while the calling thread loads into Postgres, so
two cores overlap generation/compression with COPY. Jobs are produced in batches of ``STORE_BATCH`` because
the store records a batch in one manifest transaction.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher import load
from refresher.jobs.segment import SegmentJob, SegmentTotals, fetch_tables, load_table, stored_tables
from refresher.segments import Segment
from refresher.sources.base import Source

# Segments per store write: one manifest transaction per batch keeps the lock short and the count of
# DuckDB connects low (about 2,400 segments in a cold backtesting run).
STORE_BATCH = 200


class ProgressCallback(Protocol):
    """Told after each segment: the phase, segments done of total, and rows loaded so far."""

    def __call__(self, phase: str, done: int, total: int, rows: int = 0) -> None: ...


Produced = tuple[SegmentJob, pa.Table, str]


class _Fetcher(threading.Thread):
    """Produces (job, table, content_hash) for jobs the store lacks, storing each batch first."""

    _DONE = object()

    def __init__(self, source: Source, store: FeatureStore, jobs: Sequence[SegmentJob]) -> None:
        super().__init__(name="refresher-fetch", daemon=True)
        self.source, self.store, self.jobs = source, store, jobs
        # Two batches ahead at most: enough to keep the loader busy, bounded memory (~400 segments).
        self.out: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            for start in range(0, len(self.jobs), STORE_BATCH):
                if self.cancelled.is_set():
                    return
                batch = self.jobs[start : start + STORE_BATCH]
                produced = fetch_tables(batch, self.source, self.store)
                self._put([(job, t, h) for job, (t, h) in zip(batch, produced, strict=True)])
        except BaseException as exc:  # handed to the loading thread, which re-raises it
            self._put(exc)
        finally:
            self._put(self._DONE)

    def _put(self, item: Any) -> None:
        while not self.cancelled.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def results(self) -> Iterator[Produced]:
        while True:
            item = self.out.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item


def _from_store(store: FeatureStore, source: Source, jobs: Sequence[SegmentJob]) -> Iterator[Produced]:
    for start in range(0, len(jobs), STORE_BATCH):
        yield from stored_tables(jobs[start : start + STORE_BATCH], store, source)


class InProcessExecutor:
    """Runs segment jobs against one connection; the connection must be in autocommit mode so that each
    segment's transaction is a real BEGIN/COMMIT and every finished segment survives a kill -9."""

    def __init__(self, source: Source, store: FeatureStore, conn: psycopg.Connection[Any]) -> None:
        self.source, self.store, self.conn = source, store, conn

    def run(self, jobs: Sequence[SegmentJob], progress: ProgressCallback | None = None) -> SegmentTotals:
        totals = SegmentTotals()
        emptied: list[tuple[Segment, int]] = []
        to_fetch = [job for job in jobs if job.stored_hash is None]
        in_store = [job for job in jobs if job.stored_hash is not None]
        fetcher = _Fetcher(self.source, self.store, to_fetch)
        fetcher.start()
        finished = False
        try:
            # The store reads start only once the fetcher is drained, as before: reading both at once
            # would make the two threads compete for the core the loader needs.
            for job, table, content_hash in itertools.chain(
                fetcher.results(), _from_store(self.store, self.source, in_store)
            ):
                # the rows quarantined when the table was produced (by this run or the one that stored it)
                rejects = self.source.rejects.pop(job.segment, [])
                try:
                    totals.add(load_table(self.conn, job, table, content_hash, rejects=rejects), table)
                except load.ShrinkError as exc:
                    emptied.extend(exc.emptied)  # load the rest; one error naming all of them at the end
                    totals.done += 1
                if progress:
                    progress("load", totals.done, len(jobs), totals.rows_loaded)
            finished = True
        finally:
            fetcher.cancelled.set()
            # On Ctrl-C or an error, do not wait for the batch the fetcher is producing (seconds of work): it
            # is a daemon thread, and what it stores is written crash-safe like any kill -9 would leave it.
            fetcher.join(timeout=5 if finished else 0.2)
        if emptied:
            raise load.ShrinkError.refused(emptied)
        return totals


__all__ = ["STORE_BATCH", "InProcessExecutor"]
