"""Fill the store with a profile's segments and features without any database: ``refresher warm``.

The overnight job of a team that refreshes in the morning: every segment the profile wants is fetched from its
source into the store, and every feature entry is computed from the stored bars into the store, under exactly
the keys a refresh looks up (the same plan, the same batches, the same ``compute_features``). A refresh after
it fetches nothing and computes nothing: it only loads.
"""

from __future__ import annotations

import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurestore import FeatureStore
from featurestore.errors import FeatureStoreError
from refresher import bodies, body_keys
from refresher._gc import fewer_collections
from refresher.calendar import exchange_tz
from refresher.errors import one_line
from refresher.features.cached import compute_features
from refresher.jobs.inprocess import store_batches
from refresher.jobs.segment import fetch_tables, jobs_of_plan
from refresher.profile import Profile
from refresher.refresh import ProgressCallback, compute_plan
from refresher.segments import Segment
from refresher.sources import make_source


@dataclass(frozen=True)
class WarmReport:
    """What ``warm`` put in the store: the CLI's ``--json`` renders exactly this object."""

    profile: str
    segments: int
    fetched: int
    features: int
    computed: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def warm(
    profile: Profile,
    store: FeatureStore,
    *,
    progress: ProgressCallback | None = None,
    state_dir: Path | None = None,
) -> WarmReport:
    """Store every segment and feature the profile wants that the store lacks; touches no database.

    With the cyclic collector held back, as a refresh holds it (``refresher._gc``): the same plan, jobs and
    tables, the same millions of short-lived objects. With ``state_dir`` (the CLI's), then the COPY bodies the
    profile's refills could not make (``_make_listed``)."""
    started = time.perf_counter()
    tz_of = {listing.symbol: exchange_tz(listing.exchange) for listing in profile.listings}
    with fewer_collections():
        with closing(make_source(profile)) as source:
            source.preflight()  # before a segment is stored: a wrong source.path stores nothing, in one line
            plan = compute_plan(profile, source, store, None)
            # A stored file deleted by hand keeps its manifest row (a read that misses it leaves the row): its
            # segment is fetched again here, as a refresh's load would, not trusted from the row.
            planned = jobs_of_plan(plan, tz_of)
            gone = store.files_gone([job.key for job in planned if job.stored_hash is not None])
            jobs = [job for job in planned if job.stored_hash is None or job.key in gone]
            daily: dict[Segment, pa.Table] = {}
            done = 0
            for batch in store_batches(jobs):
                done += len(batch)
                for job, (table, _hash) in zip(batch, fetch_tables(batch, source, store), strict=True):
                    if job.segment.timeframe == "1d":
                        daily[job.segment] = table
                if progress:
                    progress("fetch", done, len(jobs))
            stored = compute_plan(profile, source, store, None) if jobs else plan
        pairs = computed = 0
        for feature in compute_features(profile, store, stored, daily):
            pairs += len(feature.parts)
            computed += feature.computed
        if state_dir is not None:
            _make_listed(body_keys.keys_path(state_dir, profile.name), store, set(stored.keys.values()))
    return WarmReport(
        profile=profile.name,
        segments=len(plan.desired),
        fetched=len(jobs),
        features=pairs,
        computed=computed,
        seconds=round(time.perf_counter() - started, 3),
    )


def _make_listed(keys: Path, store: FeatureStore, wanted: set[str]) -> None:
    """Make the COPY bodies the profile's list still names (``body_keys``): those its refills could not make, a
    stored Parquet file gone or damaged, which this run fetched again (`refresher status` says so while they are
    listed, and sends the user here), or a killed refill left. Only those listed (a few, usually; not every body
    the profile lacks: those are the refills' work, off any run the user waits for), and only keys the profile
    still wants: the others leave the list (no run would fetch them again). The list is then left with what still
    cannot be made, or removed, as a refill leaves it; untouched while a refill holds it (it makes them).

    What it could not make is noted in the list it leaves (``body_keys.NotMade``), where `refresher status` reads
    it: this run asks no server, whose record keeps the refills' line, and that line (the count and reason from
    before this run) was what status said after a warm that made only some. Killed anywhere, the list is as it
    was or as left whole (``body_keys.finished``), the bodies published are whole (``make_bodies``): the next warm
    or refill makes the rest."""
    if body_keys.pending(keys):
        return
    listed, inode = body_keys.read(keys)
    if not listed:
        return
    mine = [each for each in listed if each.key in wanted]
    try:
        made = bodies.make_listed(store, mine, say=lambda line: print(line, file=sys.stderr))
        noted = body_keys.NotMade.now(len(made.said), made.said[0]) if made.said else None
        body_keys.finished(keys, inode, made.left, not_made=noted)
    except (OSError, FeatureStoreError) as exc:  # a cache: the store's segments are warm all the same
        print(f"refresher: COPY bodies not made: {one_line(exc)} (the list stays)", file=sys.stderr)


__all__ = ["WarmReport", "warm"]
