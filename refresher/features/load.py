"""Compute the profile's features through the feature store and load them, one table per feature.

A feature is recomputed only when its inputs changed: its input hash covers the feature's name, version and
parameters and the content hashes of the symbol's daily segments, all known from the store's manifest without
reading data. Changing one parameter of one entry therefore reloads that entry's table and nothing else.
``refresher_features`` in the target database records which input hash each (feature, symbol) was loaded from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import psycopg
import pyarrow as pa

from featurestore import FeatureStore
from featurestore.keys import function_identity
from refresher.features.compute import equal_weight_index
from refresher.features.registry import FeatureSpec, FeatureUse
from refresher.features.tables import (
    FeaturePart,
    feature_rows,
    read_ledger,
    remove_feature_rows,
    replace_feature_rows,
)
from refresher.plan import GapPlan, digest_parts
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


class _Compute:
    """Adapts a feature use to the store's ``compute_func(raw, config)`` calling convention; ``config`` (part of
    the store key) names the feature and its parameters, so the key covers what the computation reads."""

    def __init__(self, use: FeatureUse) -> None:
        self.use = use
        self.calls = 0

    def config(self) -> dict[str, Any]:
        return {"feature": self.use.feature, "params": dict(self.use.params)}

    def __call__(self, raw: pd.DataFrame, config: Any) -> pd.DataFrame:
        self.calls += 1
        return self.use.compute(raw)


def _version(spec: FeatureSpec) -> str:
    """The declared version plus a hash of the function's source: editing a feature recomputes it."""
    return f"{spec.version}/{function_identity(spec.compute)[1]}"


def _input_hash(use: FeatureUse, version: str, content_hashes: Sequence[str]) -> str:
    return digest_parts(use.name, use.feature, version, use.params_json, *content_hashes)


def _daily_frame(tables: Sequence[pa.Table]) -> pd.DataFrame:
    """A symbol's daily bars as the frame feature functions take: DatetimeIndex of session dates."""
    frame: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    frame = frame.drop(columns=["symbol"]).sort_values("date")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("date")), name="date")
    return frame


def refresh_features(
    conn: psycopg.Connection[Any],
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table] | None = None,
    *,
    prune: bool = False,
) -> FeatureCounts:
    """Load every (feature, symbol) of the profile whose inputs changed since it was last loaded.

    A symbol whose bars are empty loses its feature rows. With ``prune`` (``refresh --prune``, which removes
    the bars of symbols that left the profile), the feature rows of those symbols go too, and so do whole
    features the profile no longer names: feature rows never outlive the bars they were computed from.
    """
    ledger = read_ledger(conn)
    daily: dict[str, list[Segment]] = {}
    if "1d" in profile.timeframes:
        for segment in plan.desired:
            if segment.timeframe == "1d":
                daily.setdefault(segment.symbol, []).append(segment)
    pruned = _prune(conn, ledger, profile, set(daily)) if prune else 0
    if not profile.features or not daily:
        return FeatureCounts(pruned=pruned)
    entries = store.lookup(sorted({plan.keys[s] for segs in daily.values() for s in segs}))
    hashes = {
        symbol: [entries[plan.keys[s]].content_hash for s in segments] for symbol, segments in daily.items()
    }
    universe_hashes = [h for symbol in sorted(hashes) for h in (symbol, *hashes[symbol])]
    frames: dict[str, pd.DataFrame] = {}

    def frame_of(symbol: str) -> pd.DataFrame:
        if symbol not in frames:
            # Daily tables this refresh just fetched are in memory (``known``); read only the others.
            have = known or {}
            tables = store.get_many([plan.keys[s] for s in daily[symbol] if s not in have])
            frames[symbol] = _daily_frame(
                [have[s] if s in have else tables[plan.keys[s]] for s in daily[symbol]]
            )
        return frames[symbol]

    loaded_pairs = emptied = computed = rows = 0
    for use in profile.features:
        spec = use.spec
        benchmark: pd.Series | None = None
        version = _version(spec)
        todo: list[tuple[str, pd.DataFrame, str]] = []
        empty: list[FeaturePart] = []
        for symbol in sorted(daily):
            # A universe feature (correlation to the equal-weight index) depends on every symbol's bars.
            inputs = [symbol, *universe_hashes] if spec.needs_universe else hashes[symbol]
            input_hash = _input_hash(use, version, inputs)
            if ledger.get((use.name, symbol)) == input_hash:
                continue
            raw = frame_of(symbol)
            if raw.empty:
                empty.append(FeaturePart(symbol, pa.table({}), input_hash))
                continue
            if spec.needs_universe:
                if benchmark is None:
                    benchmark = equal_weight_index({sym: frame_of(sym) for sym in sorted(daily)})
                raw = raw.assign(benchmark=benchmark.reindex(raw.index))
            todo.append((symbol, raw, input_hash))
        if not todo and not empty:
            continue
        # One batch per feature: the store records every miss in one manifest transaction.
        compute = _Compute(use)
        jobs = [(symbol, raw, compute.config()) for symbol, raw, _hash in todo]
        results = store.get_or_compute_many(jobs, compute, version=version) if jobs else []
        computed += compute.calls
        parts = [
            FeaturePart(
                symbol,
                feature_rows(symbol, result if isinstance(result, pd.DataFrame) else result.to_pandas()),
                h,
            )
            for (symbol, _raw, h), result in zip(todo, results, strict=True)
        ]
        rows += replace_feature_rows(conn, use.name, parts + empty)
        loaded_pairs += len(parts)
        # Only pairs that had rows count as emptied; a symbol that never had any is merely recorded.
        emptied += sum(1 for part in empty if (use.name, part.symbol) in ledger)
    return FeatureCounts(
        desired=len(profile.features) * len(daily),
        loaded=loaded_pairs,
        computed=computed,
        rows_loaded=rows,
        pruned=pruned + emptied,
    )


def _prune(
    conn: psycopg.Connection[Any], ledger: Mapping[tuple[str, str], str], profile: Profile, symbols: set[str]
) -> int:
    """Forget features the profile no longer names, and the rows of symbols it no longer has."""
    names = {use.name for use in profile.features}
    pruned = 0
    for name in sorted({feature for feature, _symbol in ledger}):
        if name not in names:
            pruned += remove_feature_rows(conn, name)
            continue
        gone = sorted(symbol for feature, symbol in ledger if feature == name and symbol not in symbols)
        if gone:
            pruned += remove_feature_rows(conn, name, gone)
    return pruned
