"""Features computed through the feature store: which (feature, symbol) pairs need rows, and their rows.

A pair is recomputed only when its inputs changed: its input hash covers the entry's name, the feature's
version and parameters, and the content hashes of the symbol's daily segments, all known from the store's
manifest without reading data. Computed rows are cached in the store under a key of the bars' fingerprint, the
feature and its parameters, so a database that lost them, a second checkout or ``refresher warm`` finds them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from featurestore import FeatureStore
from featurestore.keys import function_identity
from refresher.features.compute import equal_weight_index
from refresher.features.registry import FeatureSpec, FeatureUse
from refresher.features.tables import FeaturePart, feature_rows
from refresher.plan import GapPlan, digest_parts
from refresher.profile import Profile
from refresher.segments import Segment


@dataclass(frozen=True)
class FeatureBatch:
    """One entry's new rows for every symbol whose inputs changed (empty rows where its bars are empty), and
    how many of them the store did not have and had to compute."""

    use: FeatureUse
    parts: list[FeaturePart]
    computed: int


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


def daily_frame(tables: Sequence[pa.Table]) -> pd.DataFrame:
    """A symbol's daily bars as the frame feature functions take: DatetimeIndex of session dates."""
    frame: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    frame = frame.drop(columns=["symbol"]).sort_values("date")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("date")), name="date")
    return frame


def daily_segments(profile: Profile, plan: GapPlan) -> dict[str, list[Segment]]:
    """Each symbol's desired daily segments: the input of every daily feature."""
    daily: dict[str, list[Segment]] = {}
    if "1d" in profile.timeframes:
        for segment in plan.desired:
            if segment.timeframe == "1d":
                daily.setdefault(segment.symbol, []).append(segment)
    return daily


def compute_features(
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table] | None = None,
    loaded: Mapping[tuple[str, str], str] | None = None,
) -> Iterator[FeatureBatch]:
    """The rows of every (entry, symbol) of the profile whose input hash differs from ``loaded``'s, one batch per
    entry; the profile's daily segments must be in the store (or in ``known``, tables already in memory)."""
    daily = daily_segments(profile, plan)
    if not profile.features or not daily:
        return
    loaded = loaded or {}
    entries = store.lookup(sorted({plan.keys[s] for segs in daily.values() for s in segs}))
    hashes = {
        symbol: [entries[plan.keys[s]].content_hash for s in segments] for symbol, segments in daily.items()
    }
    universe_hashes = [h for symbol in sorted(hashes) for h in (symbol, *hashes[symbol])]
    frames: dict[str, pd.DataFrame] = {}

    def frame_of(symbol: str) -> pd.DataFrame:
        if symbol not in frames:
            have = known or {}
            tables = store.get_many([plan.keys[s] for s in daily[symbol] if s not in have])
            frames[symbol] = daily_frame(
                [have[s] if s in have else tables[plan.keys[s]] for s in daily[symbol]]
            )
        return frames[symbol]

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
            if loaded.get((use.name, symbol)) == input_hash:
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
        parts = [
            FeaturePart(
                symbol,
                feature_rows(symbol, result if isinstance(result, pd.DataFrame) else result.to_pandas()),
                h,
            )
            for (symbol, _raw, h), result in zip(todo, results, strict=True)
        ]
        yield FeatureBatch(use, parts + empty, compute.calls)


__all__ = ["FeatureBatch", "compute_features", "daily_frame", "daily_segments"]
