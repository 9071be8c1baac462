"""Load the profile's features into its database, one table per feature, and remove the rows that went stale.

``refresher_features`` in the target database records which input hash each (feature, symbol) was loaded from;
``cached.compute_features`` yields only the pairs whose hash changed, so changing one parameter of one entry
reloads that entry's table and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from refresher.errors import FeatureError
from refresher.features.cached import FeatureBatch, compute_features
from refresher.features.tables import (
    ColumnsChanged,
    FeaturePart,
    StaleFeature,
    doubtful_rows,
    read_feature_ledger,
    read_ledger,
    rebuild_feature_rows,
    remove_feature_rows,
    replace_feature_rows,
)
from refresher.fence import Fence
from refresher.plan import GapPlan
from refresher.profile import Profile
from refresher.segments import Segment


@dataclass(frozen=True)
class FeatureCounts:
    """What one refresh did with features: (feature, symbol) pairs desired, loaded, computed and pruned (rows
    removed because the bars are empty or gone, or the feature left the profile); rows written."""

    desired: int = 0
    loaded: int = 0
    computed: int = 0
    rows_loaded: int = 0
    pruned: int = 0
    # Of ``loaded``, the pairs whose older rows stayed and only rows from a date on were replaced.
    appended: int = 0


def refresh_features(
    conn: psycopg.Connection[Any],
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table] | None = None,
    *,
    prune: bool = False,
    verify: bool = False,
    on_loaded: Callable[[str, Sequence[FeaturePart], bool], None] | None = None,
    ahead: tuple[Sequence[FeatureBatch], FeatureError | None] | None = None,
    fence: Fence | None = None,
) -> FeatureCounts:
    """Load every (feature, symbol) of the profile whose inputs changed since it was last loaded;
    ``on_loaded(name, parts, rebuild)`` is told each load committed (``refresher.replay``).

    ``verify`` (``refresh --verify``): count each symbol's rows against the ledger and reload those that differ
    (``tables.doubtful_rows``); a table dropped by hand is reloaded whole without it too.

    ``ahead``: the batches ``compute_features`` makes against an empty ledger, and its failure, computed
    earlier (``refresher.features.ahead``); used only when the database's ledger is empty still.

    ``fence`` (a queue run's features stage, ``refresher.fence``): each write transaction first checks the fence
    is still this writer's; ``FenceLost`` once a later holder of the run's lock claimed it.

    A symbol whose bars are empty loses its feature rows. With ``prune`` (``refresh --prune``, which removes
    the bars of symbols that left the profile), the feature rows of those symbols go too, and so do whole
    features the profile no longer names: feature rows never outlive the bars they were computed from.
    """
    # Rows the ledger vouches for that are not there (a table dropped by hand; with ``verify``, rows deleted) are
    # forgotten first, so they load whole: never a tail appended to rows that are gone.
    recorded = read_feature_ledger(conn)
    doubtful = doubtful_rows(conn, recorded, verify=verify)
    for name, gone in doubtful.items():
        remove_feature_rows(conn, name, gone, fence)
    if doubtful:
        recorded = read_feature_ledger(conn)
    ledger = dict(recorded.hashes)
    # The symbols ``daily_segments`` of both timeframes would name, without grouping every segment by symbol and
    # month for a count and a prune (60,000 segments at production scale, in a refresh without features too).
    symbols = {segment.symbol for segment in plan.desired if segment.timeframe in profile.timeframes}
    pruned = _prune(conn, ledger, profile, symbols, fence) if prune else 0
    desired = len(profile.features) * len(symbols) if symbols else 0
    loaded = appended = emptied = computed = rows = 0
    batches: Iterable[FeatureBatch]
    if ahead is not None and not ledger:
        batches = _then_raise(*ahead)
    else:
        batches = compute_features(profile, store, plan, known, ledger, recorded.inputs)
    failure: FeatureError | None = None
    for batch in batches:
        try:
            rows += _replace(conn, batch, on_loaded, fence)
        except StaleFeature as stale:
            # Another refresh loaded this feature while these rows were computed to extend the old ones: load
            # it whole, against the ledger as it is now (nothing, if the other one loaded the same). Rows with
            # new columns (a user's function returning others) rebuild its table: every symbol's rows, at once.
            rebuild = isinstance(stale, ColumnsChanged)
            now = read_ledger(conn)
            if rebuild:
                computed += batch.computed  # in the store now: the whole batch finds them there
                now = {pair: input_hash for pair, input_hash in now.items() if pair[0] != batch.use.name}
            again = replace(profile, features=(batch.use,))
            try:
                batch = next(compute_features(again, store, plan, known, now), FeatureBatch(batch.use, [], 0))
            except FeatureError as exc:  # every symbol's rows cannot share one table: the others still load
                failure = failure or exc
                continue
            rows += _replace(conn, batch, on_loaded, fence, rebuild=rebuild)
        computed += batch.computed
        loaded += sum(1 for part in batch.parts if part.rows.num_rows or part.since is not None)
        appended += sum(1 for part in batch.parts if part.since is not None)
        # Only pairs that had rows count as emptied; a symbol that never had any is merely recorded.
        emptied += sum(
            1
            for p in batch.parts
            if not p.rows.num_rows and p.since is None and (batch.use.name, p.symbol) in ledger
        )
    if failure is not None:
        raise failure
    return FeatureCounts(
        desired=desired,
        loaded=loaded,
        computed=computed,
        rows_loaded=rows,
        pruned=pruned + emptied,
        appended=appended,
    )


def _then_raise(batches: Sequence[FeatureBatch], failure: FeatureError | None) -> Iterator[FeatureBatch]:
    yield from batches
    if failure is not None:
        raise failure


def _replace(
    conn: psycopg.Connection[Any],
    batch: FeatureBatch,
    on_loaded: Callable[[str, Sequence[FeaturePart], bool], None] | None,
    fence: Fence | None,
    *,
    rebuild: bool = False,
) -> int:
    rows = (rebuild_feature_rows if rebuild else replace_feature_rows)(
        conn, batch.use.name, batch.parts, fence
    )
    if on_loaded is not None:
        on_loaded(batch.use.name, batch.parts, rebuild)
    return rows


def _prune(
    conn: psycopg.Connection[Any],
    ledger: Mapping[tuple[str, str], str],
    profile: Profile,
    symbols: set[str],
    fence: Fence | None,
) -> int:
    """Forget features the profile no longer names, and the rows of symbols it no longer has."""
    names = {use.name for use in profile.features}
    pruned = 0
    for name in sorted({feature for feature, _symbol in ledger}):
        if name not in names:
            pruned += remove_feature_rows(conn, name, fence=fence)
            continue
        gone = sorted(symbol for feature, symbol in ledger if feature == name and symbol not in symbols)
        if gone:
            pruned += remove_feature_rows(conn, name, gone, fence)
    return pruned
