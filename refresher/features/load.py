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
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql

from featurestore import FeatureStore
from featurestore.keys import function_identity
from refresher.errors import LoadError
from refresher.features.compute import equal_weight_index
from refresher.features.registry import FeatureSpec, FeatureUse
from refresher.load import BATCH_ROWS
from refresher.plan import GapPlan, digest_parts
from refresher.profile import Profile
from refresher.segments import Segment

FEATURES_DDL = """
CREATE TABLE IF NOT EXISTS refresher_features (
    feature text NOT NULL,
    symbol text NOT NULL,
    input_hash text NOT NULL,
    rows bigint NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (feature, symbol)
)
"""


@dataclass(frozen=True)
class FeatureCounts:
    """What one refresh did with features: (feature, symbol) pairs desired, loaded, computed; rows written."""

    desired: int = 0
    loaded: int = 0
    computed: int = 0
    rows_loaded: int = 0


def feature_table(name: str) -> str:
    """The database table holding feature ``name``'s rows."""
    return f"features_{name}"


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


def _ensure_feature_table(conn: psycopg.Connection[Any], name: str, metrics: Sequence[str]) -> None:
    """Create the feature's table; if its metric columns changed, rebuild it and forget what was loaded."""
    table = feature_table(name)
    current = [
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "AND column_name NOT IN ('symbol', 'date') ORDER BY ordinal_position",
            (table,),
        )
    ]
    if current == list(metrics):
        return
    if current:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM refresher_features WHERE feature = %s", (name,))
    columns = sql.SQL(", ").join(sql.SQL("{} double precision").format(sql.Identifier(m)) for m in metrics)
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (symbol text NOT NULL, date date NOT NULL, {}, PRIMARY KEY (symbol, date))"
        ).format(sql.Identifier(table), columns)
    )


def feature_rows(symbol: str, frame: pd.DataFrame) -> pa.Table:
    """One symbol's feature frame as the Arrow rows of its table: symbol, date, then the metrics; NaN -> NULL."""
    dates = pd.DatetimeIndex(frame.index).to_numpy().astype("datetime64[D]")
    columns = {
        "symbol": pa.array([symbol] * len(frame), pa.string()),
        "date": pa.array(dates, pa.date32()),
    }
    for name in frame.columns:
        columns[str(name)] = pa.array(frame[name].to_numpy(dtype="float64"), pa.float64(), from_pandas=True)
    return pa.table(columns)


def _load_feature(
    conn: psycopg.Connection[Any], name: str, parts: Sequence[tuple[str, pa.Table, str]]
) -> int:
    """Replace the rows of every (symbol, rows, input hash) in ``parts`` of feature ``name``; returns rows written.

    One transaction and one binary COPY per feature: a crash or Ctrl-C leaves each symbol's rows and its
    ``refresher_features`` row either all old or all new, so the next refresh redoes exactly what did not commit.
    """
    data = pa.concat_tables([rows for _symbol, rows, _hash in parts])
    metrics = data.column_names[2:]
    table = sql.Identifier(feature_table(name))
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, data.column_names))
    )
    try:
        with conn.transaction():
            _ensure_feature_table(conn, name, metrics)
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE symbol = ANY(%s)").format(table),
                ([symbol for symbol, _rows, _hash in parts],),
            )
            encoder = ArrowToPostgresBinaryEncoder(data.schema)
            # An exception here (Ctrl-C included) makes psycopg send CopyFail, and the transaction rolls back.
            with conn.cursor() as cur:
                with cur.copy(statement) as copy:
                    copy.write(encoder.write_header())
                    for batch in data.to_batches(max_chunksize=BATCH_ROWS):
                        copy.write(encoder.write_batch(batch))
                    copy.write(encoder.finish())
                cur.executemany(
                    "INSERT INTO refresher_features (feature, symbol, input_hash, rows) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (feature, symbol) DO UPDATE SET input_hash = EXCLUDED.input_hash, "
                    "rows = EXCLUDED.rows, loaded_at = now()",
                    [(name, symbol, input_hash, rows.num_rows) for symbol, rows, input_hash in parts],
                )
    except psycopg.Error as exc:
        raise LoadError(f"feature {name}: loading failed: {exc}".rstrip(), field=name) from exc
    return int(data.num_rows)


def refresh_features(
    conn: psycopg.Connection[Any],
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table] | None = None,
) -> FeatureCounts:
    """Load every (feature, symbol) of the profile whose inputs changed since it was last loaded."""
    if not profile.features or "1d" not in profile.timeframes:
        return FeatureCounts()
    conn.execute(FEATURES_DDL)
    daily: dict[str, list[Segment]] = {}
    for segment in plan.desired:
        if segment.timeframe == "1d":
            daily.setdefault(segment.symbol, []).append(segment)
    entries = store.lookup(sorted({plan.keys[s] for segs in daily.values() for s in segs}))
    loaded = {
        (feature, symbol): input_hash
        for feature, symbol, input_hash in conn.execute(
            "SELECT feature, symbol, input_hash FROM refresher_features"
        )
    }
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

    loaded_pairs = computed = rows = 0
    for use in profile.features:
        spec = use.spec
        benchmark: pd.Series | None = None
        version = _version(spec)
        todo: list[tuple[str, pd.DataFrame, str]] = []
        for symbol in sorted(daily):
            # A universe feature (correlation to the equal-weight index) depends on every symbol's bars.
            inputs = [symbol, *universe_hashes] if spec.needs_universe else hashes[symbol]
            input_hash = _input_hash(use, version, inputs)
            if loaded.get((use.name, symbol)) == input_hash:
                continue
            raw = frame_of(symbol)
            if raw.empty:
                continue
            if spec.needs_universe:
                if benchmark is None:
                    benchmark = equal_weight_index({sym: frame_of(sym) for sym in sorted(daily)})
                raw = raw.assign(benchmark=benchmark.reindex(raw.index))
            todo.append((symbol, raw, input_hash))
        if not todo:
            continue
        # One batch per feature: the store records every miss in one manifest transaction.
        compute = _Compute(use)
        jobs = [(symbol, raw, compute.config()) for symbol, raw, _hash in todo]
        results = store.get_or_compute_many(jobs, compute, version=version)
        computed += compute.calls
        parts = [
            (
                symbol,
                feature_rows(symbol, result if isinstance(result, pd.DataFrame) else result.to_pandas()),
                h,
            )
            for (symbol, _raw, h), result in zip(todo, results, strict=True)
        ]
        rows += _load_feature(conn, use.name, parts)
        loaded_pairs += len(parts)
    return FeatureCounts(
        desired=len(profile.features) * len(daily), loaded=loaded_pairs, computed=computed, rows_loaded=rows
    )
