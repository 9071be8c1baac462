"""One refresh: profile -> plan -> run the segment jobs with an executor -> features -> snapshot.

The segment jobs (``refresher.jobs``) fetch what the store lacks and load what the database lacks, each segment
in its own transaction together with its ``refresher_segments`` row, so an interrupted refresh resumes exactly
where it stopped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher import bodies, body_keys, database, load, pool, snapshot
from refresher._gc import fewer_collections
from refresher.calendar import exchange_tz, load_in_background
from refresher.engines.base import Engine, ServerInfo
from refresher.features import FeatureCounts, refresh_features
from refresher.features.ahead import FeaturesAhead
from refresher.jobs import InProcessExecutor, jobs_of_plan
from refresher.jobs.inprocess import LOADERS, Fetcher, fetch_ahead
from refresher.jobs.inprocess import ProgressCallback as ProgressCallback
from refresher.jobs.segment import SegmentJob, stored_tables
from refresher.plan import GapPlan, LedgerView, StoreView, plan_gaps, segment_keys
from refresher.profile import Profile
from refresher.replay import RefreshWrites
from refresher.segments import Segment, desired_segments
from refresher.settings import DEFAULT_POOL_SIZE, PoolSize, pool_as_asked
from refresher.sources import make_source
from refresher.sources.base import Source
from refresher.sources.reports import rows_by_reason, stored_reports


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
    """This run's store hits and misses, as ``featurestore.AccessCounts`` defines them."""

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
    # What the source left out of the desired segments (rows outside sessions, bad rows, missing files), read
    # back from the store, so a run served from the cache says it again; and those rows per reason.
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    # The warm clones the pool keeps (what the snapshot's mark records): 0, and a reset copies the database.
    pool_size: int = DEFAULT_POOL_SIZE
    # When the disk holds fewer clones than that, the refill this run spawned says so on its stderr, which
    # reaches nobody (detached): the line, as this run computed it before spawning it (``pool.disk_cut``).
    pool_disk: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanReport:
    """``refresher plan``: the gap plan and where it was computed against."""

    profile: str
    engine: str
    server_running: bool
    plan: GapPlan
    # What the source left out of segments the store already holds (see ``RefreshReport.notes``).
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "engine": self.engine,
            "server_running": self.server_running,
            "segments": self.plan.summary(),
            "to_fetch": [str(s) for s in self.plan.to_fetch],
            "to_load": [str(s) for s in self.plan.to_load],
            "stale": [str(s) for s in self.plan.stale],
            "notes": list(self.notes),
        }


def exchange_timezones(profile: Profile) -> dict[str, str]:
    return {listing.symbol: exchange_tz(listing.exchange) for listing in profile.listings}


def compute_plan(
    profile: Profile,
    source: Source,
    store: FeatureStore,
    conn: psycopg.Connection[Any] | None,
    *,
    verify: bool = False,
    count: bool = False,
) -> GapPlan:
    """The gap plan for ``profile``; ``conn`` None means "no database yet" (everything is to load).

    ``count``: a refresh's plan is its one request to the store for each segment (hits and misses, see
    ``featurestore.AccessCounts``); ``refresher plan`` only looks.
    """
    desired = desired_segments(profile)
    keys = dict(zip(desired, segment_keys(desired, source.kind, source.versions(desired)), strict=True))
    stored = StoreView(store.lookup_hashes(list(keys.values()), count=count))
    loaded = LedgerView({})
    verified: dict[Segment, int] | None = None
    if conn is not None:
        loaded = LedgerView(database.read_ledger_rows(conn))
        if verify:
            verified = database.count_rows(
                conn, list(loaded), timezones=exchange_timezones(profile), wait=load.SEGMENT_LOCK_WAIT
            )
    return plan_gaps(desired, keys, stored, loaded, verified_rows=verified)


def plan_refresh(
    profile: Profile,
    engine: Engine,
    store: FeatureStore,
    *,
    verify: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> PlanReport:
    """The plan against the profile's running server, touching nothing (no server is started); ``on_wait`` is
    told when a reset's shut door is waited for (``snapshot.connect_working``)."""
    server = engine.info(profile.name)
    with closing(make_source(profile)) as source:
        source.preflight()  # the one line a refresh would give, not a plan of segments to load empty
        if server is None:
            plan = compute_plan(profile, source, store, None)
        else:
            # A reset killed with the database's door shut left it refusing sessions: the one door opens it.
            with snapshot.connect_working(server, autocommit=True, on_wait=on_wait) as conn:
                known = database.schema_exists(conn)
                plan = compute_plan(profile, source, store, conn if known else None, verify=verify)
    notes = tuple(str(r) for r in stored_reports(store, plan.keys))
    return PlanReport(profile.name, engine.name, server is not None, plan, notes)


class DailyTables(Mapping[Segment, pa.Table]):
    """The daily tables the features step reads: those this run fetched, the others from the store on first
    use, where a file found missing or corrupt is fetched again from the source, as a segment job does."""

    def __init__(
        self, fetched: Mapping[Segment, pa.Table], plan: GapPlan, store: FeatureStore, source: Source
    ):
        self._tables = dict(fetched)
        self._plan, self._store, self._source = plan, store, source
        self._daily = [s for s in plan.desired if s.timeframe == "1d"]
        self.refetched = 0

    def __getitem__(self, segment: Segment) -> pa.Table:
        if segment not in self._tables:
            if segment.timeframe != "1d" or segment not in self._plan.keys:
                raise KeyError(segment)
            key = self._plan.keys[segment]
            stored = self._plan.stored.get(key)
            job = SegmentJob(segment, key, "UTC", stored_hash=stored.content_hash if stored else None)
            [(read, table, _hash)] = stored_tables([job], self._store, self._source)
            self.refetched += read.stored_hash is None
            self._tables[segment] = table
        return self._tables[segment]

    def __contains__(self, segment: object) -> bool:
        """Whether the table is in memory: the features step reads the others in one store request, then asks
        here for the ones the store could not serve."""
        return segment in self._tables

    def __iter__(self) -> Iterator[Segment]:
        return iter(self._daily)

    def __len__(self) -> int:
        return len(self._daily)


def _writes_to_replay(
    server: ServerInfo, conn: psycopg.Connection[Any], profile: Profile, *, prune: bool
) -> RefreshWrites | None:
    """Where to keep this run's writes for ``snapshot.advance_pristine``: only when the pristine copy holds
    what the database holds now (its clones then need exactly these writes) and nothing will be pruned."""
    if prune:
        return None
    base = snapshot.pristine_ledger(server, conn)  # the mark is in the shared catalog: no second connection
    if base is None or base != snapshot.ledger_version(conn):
        return None
    return RefreshWrites(profile, base)


class _EngineStart(threading.Thread):
    """``start()`` (the engine's start of the profile's server) on a thread of its own, while the calling thread
    plans and starts fetching."""

    def __init__(self, start: Callable[[], ServerInfo]) -> None:
        super().__init__(name="refresher-engine-start", daemon=True)
        self._start = start
        self.server: ServerInfo | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.server = self._start()
        except BaseException as exc:  # raised again on the calling thread, as if it had started the server
            self.error = exc

    def result(self) -> ServerInfo:
        self.join()
        if self.error is not None:
            raise self.error
        assert self.server is not None
        return self.server


def _note_bodies(
    state_dir: Path | None, profile: str, store: FeatureStore, jobs: Sequence[SegmentJob]
) -> Path | None:
    """Note for the refill the minute segments of ``jobs`` (this run's loads) whose COPY body the store lacks in
    this layout (``body_keys``), beside what a killed refill left; the list's path (None without a state
    directory). Not on the load: making a body there cost the cold backtesting refresh 1.7 s (8bb6c0c). A list
    that cannot be written costs only the bodies (a cache): the next load reads the Parquet files."""
    if state_dir is None:
        return None
    wanted = []
    for job in jobs:
        if job.segment.table != bodies.TABLE:
            continue
        if not bodies.has_body(store, job.stored_hash):
            wanted.append(body_keys.Wanted(job.key, job.segment.symbol, job.segment.month_label, job.tz))
    keys_file = body_keys.keys_path(state_dir, profile)
    with contextlib.suppress(OSError):
        body_keys.add(keys_file, wanted)
    return keys_file


def refresh(
    profile: Profile,
    engine: Engine,
    store: FeatureStore,
    *,
    prune: bool = False,
    verify: bool = False,
    progress: ProgressCallback | None = None,
    pool_size: PoolSize | None = None,
    loaders: int = LOADERS,
    state_dir: Path | None = None,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> RefreshReport:
    """Bring the profile's database to exactly the desired segments and features, then snapshot it with a
    pool of ``pool_size`` warm clones, the user's choice (a changed size alone resizes the pool:
    ``pool.resize_pool``; None: the size the snapshot records when the user chose it, so a size given once
    sticks, else the default the snapshot decides for this server, ``pool.default_pool_size``; ``auto``: that
    default, a size chosen before forgotten); the segments are loaded on ``loaders`` connections at once
    (``InProcessExecutor``). With ``state_dir``, the minute segments loaded whose COPY bodies the store lacks are
    noted there (``body_keys``) for the pool's detached refill to make (``refresher.bodies``); without, none are.
    Another command starting or stopping the server is waited for (``on_wait`` told), or with ``wait`` False
    ``ProfileBusy`` is raised (``Engine.start``).

    ``RefreshReport.phases`` are consecutive stretches of this thread's wall time (docs/architecture.md,
    "Refresh phases"): ``engine`` the wait for the server, ``plan`` the plan (with the schema and the
    ledger), ``segments``, ``features``, ``snapshot``. For a new server the plan comes first and the engine's
    start runs behind it and behind the first fetches, so ``engine`` is only what they did not hide.
    """
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - since, 4)
        return now

    def start_server() -> ServerInfo:
        return engine.start(profile.name, wait=wait, on_wait=on_wait)

    exchanges = [listing.exchange for listing in profile.listings]
    tz_of = exchange_timezones(profile)
    pruned = 0
    # The report's store counts are what this run added to the store's own counters (one definition, one
    # source: ``featurestore stats`` shows the same numbers summed over every run).
    store_before = store.session_counts()
    # The plan's first store read fails on a store this user may not write, but a new server is made beside it.
    store.require_writable()
    starting: _EngineStart | None = None
    ahead: Fetcher | None = None
    features_ahead: FeaturesAhead | None = None
    mark = started
    with fewer_collections(), closing(make_source(profile)) as source:
        source.preflight()  # before a new server is started beside the first fetch
        try:
            calendars: threading.Thread | None
            if engine.is_new(profile.name):
                # The server is made from nothing (template copy, password, pg_ctl start, CREATE DATABASE: 0.5-1
                # s locally, an initdb in Docker): its ledger will be empty, so the plan needs only the store,
                # and the fetcher starts into its bounded queue while the server starts on a thread of its own.
                # The calendars the fetches need are built meanwhile too (``load_in_background``).
                starting = _EngineStart(start_server)
                calendars = load_in_background(exchanges)
                plan = compute_plan(profile, source, store, None, count=True)
                jobs = jobs_of_plan(plan, tz_of, allow_shrink=profile.source.allow_shrink)
                calendars.join()  # before anything asks for a calendar
                ahead = fetch_ahead(source, store, jobs)
                if profile.features and all(use.spec.timeframe == "1d" for use in profile.features):
                    # Its feature ledger will be empty too: the features are computed from the store once the
                    # fetcher is done, on the core it leaves free while the loaders finish (``features.ahead``).
                    features_ahead = FeaturesAhead(profile, store, plan, ahead.finished)
                mark = lap("plan", mark)
                server = starting.result()
            else:
                # A server to start is a second or more of waiting: the calendars are built meanwhile rather
                # than on the first fetch (0.4-0.6 s without the CLI's cache). Not when it runs already: a no-op
                # refresh needs no calendar, and would pay for one alongside its plan.
                calendars = None if engine.info(profile.name) else load_in_background(exchanges)
                server = start_server()
                if calendars is not None:
                    calendars.join()
            mark = lap("engine", mark)
            # autocommit: each segment's transaction is then a real BEGIN/COMMIT, not a savepoint inside one long
            # implicit transaction, so every finished segment survives a kill -9.
            with snapshot.connect_working(server, autocommit=True, on_wait=on_wait) as conn:
                # Someone else's server: its role may lack what a reset needs.
                snapshot.require_privileges(conn)
                recorded = pool.recorded_pool(server, conn)  # the mark is in the shared catalog
                unfinished = pool.unfinished_analyses(conn)
                database.ensure_schema(conn)
                database.upsert_symbols(conn, profile.listings)
                writes = _writes_to_replay(server, conn, profile, prune=prune)
                if ahead is not None and database.read_ledger_rows(conn):
                    # Not the empty database planned for (another process made the server between the look
                    # and the start, and loaded into it): plan again against what it holds. What the fetcher
                    # stored stays valid; the store's requests were counted by the first plan.
                    ahead.stop()
                    ahead = None
                    if features_ahead is not None:
                        features_ahead.cancel()
                        features_ahead = None
                    plan = compute_plan(profile, source, store, conn, verify=verify)
                    jobs = jobs_of_plan(plan, tz_of, allow_shrink=profile.source.allow_shrink)
                elif ahead is None:
                    plan = compute_plan(profile, source, store, conn, verify=verify, count=True)
                    jobs = jobs_of_plan(plan, tz_of, allow_shrink=profile.source.allow_shrink)
                # else: an empty ledger, the plan's one database input, and nothing to verify: the plan made
                # ahead is the plan this database gives.
                mark = lap("plan", mark)
                if prune:
                    for segment in plan.stale:
                        load.delete_segment(conn, segment, tz=tz_of.get(segment.symbol, "UTC"))
                        pruned += 1
                executor = InProcessExecutor(
                    source,
                    store,
                    conn,
                    on_loaded=writes.loaded_segments if writes else None,
                    keep_daily=bool(profile.features),
                    connect=lambda: psycopg.connect(server.dsn(), autocommit=True),
                    loaders=loaders,
                )
                totals = executor.run(jobs, progress, ahead=ahead)
                keys_file = _note_bodies(state_dir, profile.name, store, jobs)
                mark = lap("segments", mark)
                daily = DailyTables(totals.daily_tables, plan, store, source)
                features = refresh_features(
                    conn,
                    profile,
                    store,
                    plan,
                    daily,
                    prune=prune,
                    verify=verify,
                    on_loaded=writes.loaded_features if writes else None,
                    ahead=features_ahead.batches() if features_ahead is not None else None,
                )
                mark = lap("features", mark)
                left_out = stored_reports(store, plan.keys)
                notes = [str(r) for r in left_out]
                if totals.fetched + daily.refetched > len(plan.to_fetch):
                    lost = totals.fetched + daily.refetched - len(plan.to_fetch)
                    notes.append(f"store: {lost} segment files were missing or corrupt; fetched them again")
        except BaseException as exc:
            waits = isinstance(exc, Exception)
            if ahead is not None:  # a fetcher still producing for loads that will not come
                # Waited for, as the start is below: not a batch stored after the error, behind the caller's back,
                # from the source closed on the way out (a test's teardown removes the store meanwhile).
                if waits:
                    ahead.stop()
                else:
                    ahead.cancelled.set()
            if features_ahead is not None:  # the same for the features it computes (and caches) ahead
                features_ahead.cancel()
                if waits:
                    features_ahead.join()
            if starting is not None and waits:
                # Not a server appearing after the error, behind the caller's back (a test's teardown would
                # stop nothing, then the start make it). Ctrl-C does not wait: the engine survives a start
                # cut short anywhere, as it does a kill -9.
                starting.join()
            raise

    snapshot_state = "unchanged"
    pool_disk = None
    # What the mark records after this run: the size given, or the one recorded (the unchanged path).
    pool_kept = (
        recorded.size
        if recorded is not None and pool_as_asked(pool_size, recorded.size, recorded.chosen)
        else pool_size
    )
    # The COPY bodies this run (or one before it, whose refill was killed) left to make, for the refill.
    to_make = (keys_file, store.root) if keys_file is not None and keys_file.exists() else None
    # Not "did this run load anything": an earlier run may have died between its loads and its snapshot.
    if not snapshot.is_current(server):
        # The template is made now (by writing this run's rows again into a clone of the old one where it can,
        # else by a copy); its warm clones are made by a detached process while the user starts work.
        made = None
        if writes is not None and writes.complete:
            made = snapshot.advance_pristine(server, writes.base, writes.apply, pool_size=pool_size)
        if made is None:
            made = snapshot.save_pristine(server, pool_size=pool_size, fill_pool=False)
        pool_kept = made.sizing.size
        pool_disk = pool.disk_cut(server)
        pool.spawn_refill(server, bodies=to_make)
        snapshot_state = "saved"
    elif pool_size is not None and (resized := pool.resize_pool(server, pool_size)) is not None:
        pool_kept = resized.size
        pool_disk = pool.disk_cut(server)
        pool.spawn_refill(server, bodies=to_make)
    elif unfinished or to_make is not None:
        # a reset's analyzer was killed: finish it (a refill above does too); or bodies a killed refill left
        pool.spawn_refill(server, fill=False, bodies=to_make)
    lap("snapshot", mark)
    store_spent = store.session_counts() - store_before
    return RefreshReport(
        profile=profile.name,
        engine=engine.name,
        dsn=server.dsn(with_password=False),
        segments=SegmentCounts(
            desired=len(plan.desired),
            present=len(plan.present),
            loaded=totals.loaded,
            pruned=pruned,
            fetched=totals.fetched,
            stale=len(plan.stale) - pruned,
        ),
        rows_loaded=totals.rows_loaded,
        seconds=round(time.perf_counter() - started, 3),
        store=StoreCounts(hits=store_spent.hits, misses=store_spent.misses),
        features=features,
        snapshot=snapshot_state,
        phases=phases,
        notes=notes,
        left_out=rows_by_reason(left_out),
        pool_size=pool_kept if isinstance(pool_kept, int) else DEFAULT_POOL_SIZE,
        pool_disk=pool_disk,
    )
