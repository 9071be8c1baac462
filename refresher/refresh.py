"""One refresh: profile -> plan -> fetch what the store lacks -> load what the database lacks -> snapshot.

Fetching (source + store write) runs in a producer thread while the main thread loads into Postgres, so the
two cores overlap generation/compression with COPY. Each segment loads in its own transaction together with its
``refresher_segments`` row, so an interrupted refresh resumes exactly where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher import database, load, snapshot
from refresher.calendar import get_calendar
from refresher.engines.base import Engine, ServerInfo
from refresher.errors import LoadError
from refresher.features import FeatureCounts, refresh_features
from refresher.plan import DatabaseSegment, GapPlan, StoredSegment, plan_gaps, segment_key
from refresher.profile import Profile
from refresher.segments import Segment, desired_segments
from refresher.sources import make_source
from refresher.sources.base import Source

# Segments per store write: one manifest transaction per batch keeps the lock short and the count of
# DuckDB connects low (about 2,400 segments in a cold backtesting run).
STORE_BATCH = 200


class ProgressCallback(Protocol):
    """Told after each segment: the phase, segments done of total, and rows loaded so far."""

    def __call__(self, phase: str, done: int, total: int, rows: int = 0) -> None: ...


@dataclass(frozen=True)
class SegmentCounts:
    desired: int
    present: int
    loaded: int
    pruned: int
    fetched: int
    stale: int


@dataclass(frozen=True)
class StoreCounts:
    hits: int
    misses: int


@dataclass(frozen=True)
class RefreshReport:
    """What a refresh did: the CLI's ``--json`` renders exactly this object."""

    profile: str
    engine: str
    dsn: str
    segments: SegmentCounts
    rows_loaded: int
    seconds: float
    store: StoreCounts
    features: FeatureCounts
    snapshot: str
    phases: dict[str, float] = field(default_factory=dict)
    # What the source noticed and did not load (rows outside sessions, missing files).
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanReport:
    """``refresher plan``: the gap plan and where it was computed against."""

    profile: str
    engine: str
    server_running: bool
    plan: GapPlan

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "engine": self.engine,
            "server_running": self.server_running,
            "segments": self.plan.summary(),
            "to_fetch": [str(s) for s in self.plan.to_fetch],
            "to_load": [str(s) for s in self.plan.to_load],
            "stale": [str(s) for s in self.plan.stale],
        }


def _timezones(profile: Profile) -> dict[str, str]:
    return {listing.symbol: str(get_calendar(listing.exchange).tz) for listing in profile.listings}


def compute_plan(
    profile: Profile,
    source: Source,
    store: FeatureStore,
    conn: psycopg.Connection[Any] | None,
    *,
    verify: bool = False,
) -> GapPlan:
    """The gap plan for ``profile``; ``conn`` None means "no database yet" (everything is to load)."""
    desired = desired_segments(profile)
    keys = {s: segment_key(s, source.kind, source.version(s)) for s in desired}
    stored = {
        key: StoredSegment(key, entry.content_hash, entry.rows)
        for key, entry in store.lookup(sorted(set(keys.values()))).items()
    }
    loaded: dict[Segment, DatabaseSegment] = {}
    verified: dict[Segment, int] | None = None
    if conn is not None:
        loaded = {
            s: DatabaseSegment(row.content_hash, row.rows)
            for s, row in database.read_loaded_segments(conn).items()
        }
        if verify:
            verified = database.count_rows(conn, list(loaded), timezones=_timezones(profile))
    return plan_gaps(desired, keys, stored, loaded, verified_rows=verified)


def plan_refresh(
    profile: Profile, engine: Engine, store: FeatureStore, *, verify: bool = False
) -> PlanReport:
    """The plan against the profile's running server, touching nothing (no server is started)."""
    server = engine.info(profile.name)
    with closing(make_source(profile)) as source:
        if server is None:
            return PlanReport(profile.name, engine.name, False, compute_plan(profile, source, store, None))
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            if not database.schema_exists(conn):
                return PlanReport(profile.name, engine.name, True, compute_plan(profile, source, store, None))
            return PlanReport(
                profile.name, engine.name, True, compute_plan(profile, source, store, conn, verify=verify)
            )


class _Fetcher(threading.Thread):
    """Produces (segment, table, content_hash) for segments the store lacks, storing each batch first."""

    _DONE = object()

    def __init__(self, source: Source, store: FeatureStore, plan: GapPlan) -> None:
        super().__init__(name="refresher-fetch", daemon=True)
        self.source, self.store, self.plan = source, store, plan
        # Two batches ahead at most: enough to keep the loader busy, bounded memory (~400 segments).
        self.out: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.cancelled = threading.Event()

    def run(self) -> None:
        try:
            todo = list(self.plan.to_fetch)
            for start in range(0, len(todo), STORE_BATCH):
                if self.cancelled.is_set():
                    return
                batch = todo[start : start + STORE_BATCH]
                tables = [self.source.fetch(s) for s in batch]
                entries = self.store.put_many(
                    (self.plan.keys[s], t, s.symbol) for s, t in zip(batch, tables, strict=True)
                )
                self._put([(s, t, e.content_hash) for s, t, e in zip(batch, tables, entries, strict=True)])
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

    def results(self) -> Iterator[tuple[Segment, pa.Table, str]]:
        while True:
            item = self.out.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item


def _stored_tables(
    store: FeatureStore, plan: GapPlan, segments: Sequence[Segment]
) -> Iterator[tuple[Segment, pa.Table, str]]:
    for start in range(0, len(segments), STORE_BATCH):
        batch = segments[start : start + STORE_BATCH]
        keys = [plan.keys[s] for s in batch]
        tables = store.get_many(keys)
        for segment, key in zip(batch, keys, strict=True):
            if key not in tables:
                raise LoadError(f"segment {segment}: store entry {key} vanished or is corrupt; run again")
            yield segment, tables[key], plan.stored[key].content_hash


def refresh(
    profile: Profile,
    engine: Engine,
    store: FeatureStore,
    *,
    prune: bool = False,
    verify: bool = False,
    progress: ProgressCallback | None = None,
) -> RefreshReport:
    """Bring the profile's database to exactly the desired segments and features, then snapshot it."""
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 4)
        return now

    server: ServerInfo = engine.start(profile.name)
    mark = lap("engine", started)
    tz_of = _timezones(profile)
    rows_loaded = loaded_count = pruned = fetched = 0
    # autocommit: each load_segment's transaction() is then a real BEGIN/COMMIT, not a savepoint inside one
    # long implicit transaction, so every finished segment survives a kill -9.
    with closing(make_source(profile)) as source, psycopg.connect(server.dsn(), autocommit=True) as conn:
        database.ensure_schema(conn)
        database.upsert_symbols(conn, profile.listings)
        plan = compute_plan(profile, source, store, conn, verify=verify)
        mark = lap("plan", mark)
        total = len(plan.to_load) + len(plan.to_fetch)
        done = 0

        if prune:
            for segment in plan.stale:
                load.delete_segment(conn, segment, tz=tz_of.get(segment.symbol, "UTC"))
                pruned += 1

        daily_tables: dict[Segment, pa.Table] = {}  # what features need, kept from the fetch
        fetcher = _Fetcher(source, store, plan)
        fetcher.start()
        try:
            for segment, table, content_hash in fetcher.results():
                fetched += 1
                if segment.timeframe == "1d":
                    daily_tables[segment] = table
                done += 1
                in_db = plan.loaded.get(segment)
                if in_db is None or in_db.content_hash != content_hash:
                    rows_loaded += load.load_segment(
                        conn, segment, table, content_hash, tz=tz_of[segment.symbol]
                    )
                    loaded_count += 1
                if progress:
                    progress("load", done, total, rows_loaded)
            for segment, table, content_hash in _stored_tables(store, plan, plan.to_load):
                rows_loaded += load.load_segment(conn, segment, table, content_hash, tz=tz_of[segment.symbol])
                loaded_count += 1
                done += 1
                if progress:
                    progress("load", done, total, rows_loaded)
        finally:
            fetcher.cancelled.set()
            fetcher.join(timeout=5)
        mark = lap("segments", mark)

        features = refresh_features(conn, profile, store, plan, daily_tables)
        mark = lap("features", mark)
        notes = [str(r) for r in getattr(source, "reports", [])]

    changed = bool(loaded_count or pruned or features.loaded)
    snapshot_state = "unchanged"
    if changed or not snapshot.has_pristine(server):
        # The template is made now; its warm clones are made by a detached process while the user starts work.
        snapshot.save_pristine(server, fill_pool=False)
        snapshot.spawn_refill(server)
        snapshot_state = "saved"
    lap("snapshot", mark)
    return RefreshReport(
        profile=profile.name,
        engine=engine.name,
        dsn=server.dsn(with_password=False),
        segments=SegmentCounts(
            desired=len(plan.desired),
            present=len(plan.present),
            loaded=loaded_count,
            pruned=pruned,
            fetched=fetched,
            stale=len(plan.stale) - pruned,
        ),
        rows_loaded=rows_loaded,
        seconds=round(time.perf_counter() - started, 3),
        store=StoreCounts(hits=len(plan.desired) - len(plan.to_fetch), misses=len(plan.to_fetch)),
        features=features,
        snapshot=snapshot_state,
        phases=phases,
        notes=notes,
    )
